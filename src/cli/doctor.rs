//! `plugca doctor DIR`: run every load check of the server on a cacerts
//! directory without starting it, and explain each problem: what is wrong,
//! where, and the likely fix. The findings come from [`findings`] (the checks
//! themselves from `ca::bundle::inspect`); this module only prints them.

pub mod findings;

use std::fmt::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Args;

use self::findings::{CertReport, Report, Severity};

/// Exit code when the bundle has errors.
pub const EXIT_PROBLEMS: u8 = 1;
/// Exit code when there is nothing to check (directory unreadable, no bundle files).
pub const EXIT_UNREADABLE: u8 = 2;

#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// The cacerts directory to check.
    pub dir: PathBuf,
    /// Print one JSON document instead of text.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: DoctorArgs) -> ExitCode {
    match findings::diagnose(&args.dir, time::OffsetDateTime::now_utc()) {
        Ok(report) => {
            if args.json {
                print_json(serde_json::to_string_pretty(&report));
            } else {
                print!("{}", render(&report));
            }
            if report.healthy {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_PROBLEMS)
            }
        }
        Err(e) => {
            if args.json {
                print_json(serde_json::to_string_pretty(&serde_json::json!({
                    "directory": args.dir.display().to_string(),
                    "healthy": false,
                    "error": { "code": e.code(), "message": e.to_string() },
                })));
            } else {
                eprintln!("plugca doctor: {e}");
            }
            ExitCode::from(EXIT_UNREADABLE)
        }
    }
}

fn print_json(text: serde_json::Result<String>) {
    match text {
        Ok(text) => println!("{text}"),
        Err(e) => eprintln!("plugca doctor: cannot write JSON: {e}"),
    }
}

/// The human report.
pub fn render(r: &Report) -> String {
    let mut out = String::new();
    // Writing to a String cannot fail.
    let _ = write_report(&mut out, r);
    out
}

fn write_report(out: &mut String, r: &Report) -> std::fmt::Result {
    writeln!(out, "plugca doctor {}", r.directory)?;
    writeln!(out, "layout: {}", r.layout.description)?;

    writeln!(out, "\nfiles:")?;
    let width = r.files.iter().map(|f| f.name.len()).max().unwrap_or(0);
    let role_width = r.files.iter().map(|f| f.role.len()).max().unwrap_or(0);
    for f in &r.files {
        let state = if !f.present {
            "MISSING".to_string()
        } else if !f.readable {
            "UNREADABLE".to_string()
        } else {
            let mut s = format!("{} bytes", f.bytes.unwrap_or(0));
            if !f.pem_blocks.is_empty() {
                write!(s, ", {}", f.pem_blocks.join(" + "))?;
            }
            if f.trailing_newline == Some(false) {
                s.push_str(", no trailing newline");
            }
            s
        };
        writeln!(out, "  {:width$}  {:role_width$}  {state}", f.name, f.role)?;
    }

    if let Some(k) = &r.key {
        let what = match (&k.key_type, &k.format) {
            (Some(t), Some(f)) => format!(
                "{t} ({f}{})",
                if k.ec_parameters_block {
                    " after EC PARAMETERS"
                } else {
                    ""
                }
            ),
            _ => "does not parse".to_string(),
        };
        let matches = if k.matches_signing_cert {
            "matches the signing certificate".to_string()
        } else if let Some(owner) = &k.matches_certificate {
            format!("does NOT match the signing certificate; it is the key of {owner}")
        } else if k.key_type.is_some() {
            "does NOT match the signing certificate nor any certificate here".to_string()
        } else {
            String::new()
        };
        writeln!(
            out,
            "\nkey: {}: {what}{}{matches}",
            k.file,
            if matches.is_empty() { "" } else { ", " }
        )?;
    }

    if !r.certificates.is_empty() {
        writeln!(out, "\ncertificates:")?;
        for c in &r.certificates {
            write_cert(out, c)?;
        }
    }

    if !r.chain.is_empty() {
        writeln!(out, "\nchain (signing certificate to root):")?;
        for (depth, link) in r.chain.iter().enumerate() {
            let branch = if depth == 0 {
                "  ".to_string()
            } else {
                format!("  {}└─ ", "   ".repeat(depth - 1))
            };
            let subject = if link.subject.is_empty() {
                "<empty subject>".to_string()
            } else {
                format!("\"{}\"", link.subject)
            };
            writeln!(
                out,
                "{branch}{}  {subject}  [{}]",
                link.certificate, link.role
            )?;
        }
        if let Some(why) = &r.chain_break {
            writeln!(
                out,
                "  {}└─ ✗ the chain stops here: {why}",
                "   ".repeat(r.chain.len() - 1)
            )?;
        }
    }

    let count = |s: Severity| r.problems.iter().filter(|p| p.severity == s).count();
    let (errors, warnings, notes) = (
        count(Severity::Error),
        count(Severity::Warning),
        count(Severity::Note),
    );
    if r.problems.is_empty() {
        writeln!(out, "\nproblems: none")?;
    } else {
        writeln!(out, "\nproblems:")?;
        for p in &r.problems {
            let file = p
                .file
                .as_deref()
                .map(|f| format!(" {f}:"))
                .unwrap_or_default();
            writeln!(out, "  {} [{}]{file} {}", p.severity, p.code, p.message)?;
            if let Some(d) = &p.detail {
                writeln!(out, "      why: {d}")?;
            }
            if let Some(f) = &p.fix {
                writeln!(out, "      fix: {f}")?;
            }
        }
    }
    let tally = format!("{errors} error(s), {warnings} warning(s), {notes} note(s)");
    if r.healthy {
        writeln!(
            out,
            "\nresult: healthy, plugca serve loads this bundle ({tally})"
        )?;
    } else {
        writeln!(
            out,
            "\nresult: PROBLEMS, plugca serve refuses this bundle ({tally}); it would fail with: {}",
            r.load_error.as_deref().unwrap_or("?")
        )?;
    }
    Ok(())
}

fn write_cert(out: &mut String, c: &CertReport) -> std::fmt::Result {
    let name = format!("{} #{}", c.file, c.index);
    if let Some(same) = &c.same_as {
        return writeln!(out, "  {name}: same certificate as {same} ({})", c.role);
    }
    writeln!(out, "  {name}: {}", c.role)?;
    let none = || "(none)".to_string();
    let or_empty = |s: &str| {
        if s.is_empty() {
            "<empty>".to_string()
        } else {
            s.to_string()
        }
    };
    writeln!(out, "    subject:    {}", or_empty(&c.subject))?;
    writeln!(
        out,
        "    issuer:     {}{}",
        or_empty(&c.issuer),
        if c.self_signed { " (self-signed)" } else { "" }
    )?;
    writeln!(
        out,
        "    key:        {}    signature: {}{}",
        c.key_type.as_deref().unwrap_or("unknown"),
        c.signature_algorithm,
        if c.weak_signature { " (WEAK)" } else { "" }
    )?;
    let left = if c.days_left < 0 {
        format!("EXPIRED {} day(s) ago", -c.days_left)
    } else {
        format!("{} day(s) left", c.days_left)
    };
    writeln!(
        out,
        "    valid:      {} to {} ({left})",
        c.not_before, c.not_after
    )?;
    let path_len = c
        .path_len
        .map(|n| format!("pathlen:{n}"))
        .unwrap_or_else(|| "no pathlen".into());
    if c.is_ca {
        writeln!(out, "    CA:         yes, {path_len}")?;
    } else {
        writeln!(out, "    CA:         no")?;
    }
    writeln!(
        out,
        "    key usage:  {}",
        c.key_usage
            .as_ref()
            .map(|k| k.join(", "))
            .unwrap_or_else(none)
    )?;
    writeln!(
        out,
        "    ext. usage: {}",
        c.extended_key_usage
            .as_ref()
            .map(|k| k.join(", "))
            .unwrap_or_else(none)
    )?;
    if !c.subject_alt_names.is_empty() {
        writeln!(out, "    SAN:        {}", c.subject_alt_names.join(", "))?;
    }
    writeln!(
        out,
        "    SKI:        {}",
        c.subject_key_id.clone().unwrap_or_else(none)
    )?;
    writeln!(
        out,
        "    AKI:        {}",
        c.authority_key_id.clone().unwrap_or_else(none)
    )?;
    writeln!(out, "    serial:     {}", c.serial)?;
    writeln!(out, "    sha256:     {}", c.sha256)?;
    if let Some(sample) = c.istio_sample {
        writeln!(out, "    Istio sample: {sample} (public test material)")?;
    }
    Ok(())
}
