//! A small, bounded PEM scanner that keeps the original text of every block.
//!
//! Istio's response layout is defined on the *text* of the plugged files (each
//! chain certificate as its own element, the root bundle verbatim), so the CA
//! bundle needs both the decoded DER and the exact source span of each block.

use base64::Engine as _;

/// Most PEM blocks accepted in one file (chains, root bundles, key files).
pub const MAX_BLOCKS: usize = 32;

/// One PEM block: its label, decoded body and the source text from `BEGIN` to `END`.
#[derive(Clone, PartialEq, Eq)]
pub struct Block {
    pub label: String,
    pub der: Vec<u8>,
    /// `-----BEGIN ...` through `-----END ...-----`, without a trailing newline.
    pub text: String,
}

impl std::fmt::Debug for Block {
    // Key blocks go through this type too: never print the body.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Block")
            .field("label", &self.label)
            .field("der_len", &self.der.len())
            .finish()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    #[error("no PEM block found")]
    Empty,
    #[error("PEM block {index} (\"{label}\") has no END line")]
    Unterminated { index: usize, label: String },
    #[error("PEM block {index} begins with \"{begin}\" but ends with \"{end}\"")]
    MismatchedEnd {
        index: usize,
        begin: String,
        end: String,
    },
    #[error("PEM block {index} (\"{label}\") is not valid base64")]
    Base64 { index: usize, label: String },
    #[error("more than {max} PEM blocks")]
    TooMany { max: usize },
}

const BEGIN: &str = "-----BEGIN ";
const END: &str = "-----END ";
const DASHES: &str = "-----";

/// Parses every PEM block in `input`; text between blocks is ignored.
/// An input with no block at all is [`PemError::Empty`].
pub fn parse_all(input: &str) -> Result<Vec<Block>, PemError> {
    parse_blocks(input, MAX_BLOCKS)
}

/// Parses only the first PEM block of `input`; anything after it is ignored
/// (Istio reads a CSR this way).
pub fn parse_first(input: &str) -> Result<Block, PemError> {
    let mut blocks = parse_blocks(input, 1)?;
    Ok(blocks.remove(0))
}

fn parse_blocks(input: &str, max: usize) -> Result<Vec<Block>, PemError> {
    let mut blocks = Vec::new();
    let mut rest = input;
    while let Some(start) = rest.find(BEGIN) {
        if blocks.len() == max {
            if max == 1 {
                break;
            }
            return Err(PemError::TooMany { max });
        }
        let index = blocks.len();
        let after_begin = &rest[start + BEGIN.len()..];
        let line_end = after_begin.find('\n').unwrap_or(after_begin.len());
        let begin_line = after_begin[..line_end].trim_end_matches('\r');
        let label = begin_line
            .strip_suffix(DASHES)
            .unwrap_or(begin_line)
            .to_string();
        let body_start = start + BEGIN.len() + line_end;
        let Some(end_rel) = rest[body_start..].find(END) else {
            return Err(PemError::Unterminated { index, label });
        };
        let end_start = body_start + end_rel;
        let after_end = &rest[end_start + END.len()..];
        let end_line_len = after_end.find('\n').unwrap_or(after_end.len());
        let end_line = after_end[..end_line_len].trim_end_matches('\r');
        let end_label = end_line.strip_suffix(DASHES).unwrap_or(end_line);
        if end_label != label {
            return Err(PemError::MismatchedEnd {
                index,
                begin: label,
                end: end_label.to_string(),
            });
        }
        // Bytes, not chars: base64 is ASCII, and a non-ASCII byte fails the decode below.
        let body: Vec<u8> = rest[body_start..end_start]
            .bytes()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        if body.contains(&b':') {
            // RFC 1421 headers (Proc-Type, DEK-Info): only encrypted legacy keys use them.
            return Err(PemError::Base64 { index, label });
        }
        let der = base64::engine::general_purpose::STANDARD
            .decode(&body)
            .map_err(|_| PemError::Base64 {
                index,
                label: label.clone(),
            })?;
        let text_end = end_start + END.len() + end_line.len();
        blocks.push(Block {
            label,
            der,
            text: rest[start..text_end].to_string(),
        });
        rest = &rest[text_end..];
    }
    if blocks.is_empty() {
        return Err(PemError::Empty);
    }
    Ok(blocks)
}

/// Encodes DER as PEM with 64-column lines and one trailing newline.
pub fn encode(label: &str, der: &[u8]) -> String {
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::with_capacity(b64.len() + b64.len() / 64 + 2 * label.len() + 40);
    out.push_str(BEGIN);
    out.push_str(label);
    out.push_str("-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        // base64 output is ASCII, so every chunk is valid UTF-8.
        out.push_str(std::str::from_utf8(chunk).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(END);
    out.push_str(label);
    out.push_str("-----\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = include_str!("../certs/root-cert.pem");

    #[test]
    fn a_round_trip_keeps_der_and_text() {
        let blocks = parse_all(CERT).unwrap();
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].label, "CERTIFICATE");
        assert_eq!(
            encode("CERTIFICATE", &blocks[0].der),
            format!("{}\n", blocks[0].text)
        );
    }

    #[test]
    fn text_around_blocks_is_ignored_and_crlf_is_accepted() {
        let input = format!("Bag Attributes\n{}\nBogus", CERT.replace('\n', "\r\n"));
        let blocks = parse_all(&input).unwrap();
        assert_eq!(blocks.len(), 1);
        assert_eq!(blocks[0].der, parse_all(CERT).unwrap()[0].der);
    }

    #[test]
    fn broken_inputs_name_the_problem() {
        assert_eq!(parse_all("dumb CSR"), Err(PemError::Empty));
        assert_eq!(
            parse_all("-----BEGIN X-----\nAAAA\n"),
            Err(PemError::Unterminated {
                index: 0,
                label: "X".into()
            })
        );
        assert_eq!(
            parse_all("-----BEGIN X-----\nAAAA\n-----END Y-----\n"),
            Err(PemError::MismatchedEnd {
                index: 0,
                begin: "X".into(),
                end: "Y".into()
            })
        );
        assert_eq!(
            parse_all("-----BEGIN X-----\n!!!!\n-----END X-----\n"),
            Err(PemError::Base64 {
                index: 0,
                label: "X".into()
            })
        );
        let many = "-----BEGIN X-----\nAAAA\n-----END X-----\n".repeat(MAX_BLOCKS + 1);
        assert_eq!(parse_all(&many), Err(PemError::TooMany { max: MAX_BLOCKS }));
    }
}
