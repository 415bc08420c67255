//! Logging that never blocks a request (issue 12, item 4).
//!
//! Every log line goes into a bounded in-memory queue that one background
//! thread writes to stderr. A writer never waits: when stderr is not read
//! (a pipe nobody drains, a stuck log collector) the queue fills and further
//! lines are dropped and counted in `plugca_log_lines_dropped_total{kind,
//! reason="buffer_full"}`, so request threads, `/healthz` and `/ready` keep
//! running. Refusal audit lines are also rate-limited per server
//! ([`RefusalLogLimit`]), so an unauthenticated flood cannot fill the queue
//! and push out issuance lines; those suppressed are counted with
//! `reason="rate_limited"` and the next refusal line that is written says how
//! many came before it (`suppressed_before`).

use std::io::Write as _;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{LazyLock, Mutex};
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use tracing::{Level, Metadata};
use tracing_subscriber::fmt::MakeWriter;

use crate::config::LogFormat;

/// Lines queued for stderr before new ones are dropped (`--log-buffer-lines`).
pub const DEFAULT_BUFFER_LINES: usize = 16_384;
/// Refusal audit lines written per second per server, after a burst of
/// [`REFUSAL_LOG_BURST`]; the rest are counted, not written.
pub const REFUSAL_LOG_PER_SECOND: u32 = 100;
pub const REFUSAL_LOG_BURST: u32 = 200;
/// Target of the audit lines (`server/audit.rs`): issuances at INFO,
/// refusals at WARN. The queue counts drops per kind by these two facts.
pub const AUDIT_TARGET: &str = "plugca::audit";
/// How long exiting waits for queued lines to reach stderr.
const FLUSH_ON_EXIT: Duration = Duration::from_secs(1);
/// Dropped lines are reported in the log at most this often, and only once
/// stderr takes lines again.
const DROP_REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// The writer thread's pause after each batch: how late a line can reach
/// stderr under load, and what saves a thread wake-up per line.
const BATCH_INTERVAL: Duration = Duration::from_millis(5);
/// At most this many lines per batch, so a flood still gets flushed and the
/// drop report still runs.
const BATCH_LINES: usize = 4096;
/// The buffer between a batch and `out`.
const BATCH_BYTES: usize = 64 * 1024;

/// Which kind of line was dropped.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum LineKind {
    /// An audit line of an issued certificate.
    issuance,
    /// An audit line of a refused request.
    refusal,
    /// Any other line.
    other,
}

impl LineKind {
    fn of(meta: &Metadata<'_>) -> LineKind {
        match (meta.target() == AUDIT_TARGET, *meta.level()) {
            (true, Level::INFO) => LineKind::issuance,
            (true, _) => LineKind::refusal,
            (false, _) => LineKind::other,
        }
    }
}

/// Why a line was not written.
#[derive(Debug, Clone, Copy, Hash, PartialEq, Eq, EncodeLabelValue)]
#[allow(non_camel_case_types)]
pub enum DropReason {
    /// The queue to stderr was full (stderr not read fast enough).
    buffer_full,
    /// Over the refusal audit line rate.
    rate_limited,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DroppedLabels {
    pub kind: LineKind,
    pub reason: DropReason,
}

/// Process-wide, like the log sink itself: every server's registry shows it.
static DROPPED: LazyLock<Family<DroppedLabels, Counter>> = LazyLock::new(Family::default);

/// Counts one line that was not written.
pub fn count_dropped(kind: LineKind, reason: DropReason) {
    DROPPED.get_or_create(&DroppedLabels { kind, reason }).inc();
}

/// Lines dropped so far for `kind` and `reason`.
pub fn dropped(kind: LineKind, reason: DropReason) -> u64 {
    DROPPED.get_or_create(&DroppedLabels { kind, reason }).get()
}

fn dropped_buffer_full() -> u64 {
    [LineKind::issuance, LineKind::refusal, LineKind::other]
        .into_iter()
        .map(|k| dropped(k, DropReason::buffer_full))
        .sum()
}

/// Registers `plugca_log_lines_dropped_total`.
pub fn register(registry: &mut Registry) {
    registry.register(
        "plugca_log_lines_dropped",
        "Log lines not written: the queue to stderr was full (buffer_full) or refusal audit lines were over their rate (rate_limited)",
        DROPPED.clone(),
    );
}

/// Installs the global subscriber writing through the queue; keep the guard
/// until exit (dropping it waits up to a second for queued lines).
pub fn init(format: LogFormat, default_level: &str, buffer_lines: usize) -> LogGuard {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let (sink, guard) = Queue::start(buffer_lines, std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(sink);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    guard
}

/// A message to the writer thread.
enum Msg {
    Line(Vec<u8>),
    /// Everything queued before has been written: say so on the channel.
    Flush(SyncSender<()>),
}

/// The `MakeWriter` side of the queue: one [`Line`] per event.
#[derive(Clone)]
pub struct Queue {
    tx: SyncSender<Msg>,
}

impl Queue {
    /// Starts the writer thread for `out` with room for `lines` queued lines.
    pub fn start(lines: usize, out: impl std::io::Write + Send + 'static) -> (Queue, LogGuard) {
        let (tx, rx) = mpsc::sync_channel(lines.max(1));
        let spawned = std::thread::Builder::new()
            .name("plugca-log".into())
            .spawn(move || write_lines(rx, out));
        if let Err(e) = spawned {
            // Without the thread nothing drains the queue: every line is
            // dropped and counted, and the server still runs.
            eprintln!("plugca: cannot start the log writer thread: {e}");
        }
        (Queue { tx: tx.clone() }, LogGuard { tx })
    }
}

impl<'a> MakeWriter<'a> for Queue {
    type Writer = Line<'a>;

    fn make_writer(&'a self) -> Self::Writer {
        Line {
            tx: &self.tx,
            kind: LineKind::other,
        }
    }

    fn make_writer_for(&'a self, meta: &Metadata<'_>) -> Self::Writer {
        Line {
            tx: &self.tx,
            kind: LineKind::of(meta),
        }
    }
}

/// One formatted event (the fmt layer writes each event in one call).
pub struct Line<'a> {
    tx: &'a SyncSender<Msg>,
    kind: LineKind,
}

impl std::io::Write for Line<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        // Full (stderr not read fast enough) or no writer thread.
        if self.tx.try_send(Msg::Line(buf.to_vec())).is_err() {
            count_dropped(self.kind, DropReason::buffer_full);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The writer thread: blocks on `out` (that is its job), never on a request.
///
/// It writes in batches: after each batch it sleeps [`BATCH_INTERVAL`], so
/// under load the lines of that interval wait in the queue and a logging
/// request never has to wake this thread (a parked receiver costs the sender
/// a futex wake and the thread a context switch: one per issuance before).
/// A batch goes to `out` through a buffer, in one write where it fits.
fn write_lines(rx: Receiver<Msg>, out: impl std::io::Write) {
    let mut out = std::io::BufWriter::with_capacity(BATCH_BYTES, out);
    let mut reported = 0;
    let mut last_report = Instant::now();
    loop {
        match rx.recv_timeout(DROP_REPORT_INTERVAL) {
            Ok(first) => {
                let mut next = Some(first);
                let mut taken = 0;
                while let Some(msg) = next {
                    match msg {
                        // A write error (stderr closed) loses the line; nothing to tell.
                        Msg::Line(line) => {
                            let _ = out.write_all(&line);
                        }
                        Msg::Flush(done) => {
                            let _ = out.flush();
                            let _ = done.send(());
                        }
                    }
                    taken += 1;
                    next = if taken < BATCH_LINES {
                        rx.try_recv().ok()
                    } else {
                        None
                    };
                }
                let _ = out.flush();
            }
            Err(RecvTimeoutError::Timeout) => {}
            // Every batch was flushed: nothing is left in the buffer.
            Err(RecvTimeoutError::Disconnected) => return,
        }
        // stderr takes lines again: say once a second how many were lost.
        let total = dropped_buffer_full();
        if total > reported && last_report.elapsed() >= DROP_REPORT_INTERVAL {
            tracing::warn!(
                target: "plugca::logging",
                dropped = total - reported,
                dropped_total = total,
                "log lines were dropped because stderr was not read fast enough (plugca_log_lines_dropped_total)"
            );
            reported = total;
            last_report = Instant::now();
        }
        std::thread::sleep(BATCH_INTERVAL);
    }
}

/// Keeps the queue's writer alive; dropping it waits briefly for queued lines.
pub struct LogGuard {
    tx: SyncSender<Msg>,
}

impl Drop for LogGuard {
    fn drop(&mut self) {
        let deadline = Instant::now() + FLUSH_ON_EXIT;
        let (done_tx, done_rx) = mpsc::sync_channel(1);
        let mut flush = Msg::Flush(done_tx);
        // A full queue (stderr not read) must not hold up exiting.
        loop {
            match self.tx.try_send(flush) {
                Ok(()) => break,
                Err(TrySendError::Full(m)) if Instant::now() < deadline => {
                    flush = m;
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(_) => return,
            }
        }
        let _ = done_rx.recv_timeout(deadline.saturating_duration_since(Instant::now()));
    }
}

/// A token bucket for refusal audit lines: [`REFUSAL_LOG_BURST`] at once,
/// then [`REFUSAL_LOG_PER_SECOND`].
#[derive(Debug)]
pub struct RefusalLogLimit {
    per_second: f64,
    burst: f64,
    bucket: Mutex<Bucket>,
}

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
    suppressed: u64,
}

impl Default for RefusalLogLimit {
    fn default() -> Self {
        RefusalLogLimit::new(REFUSAL_LOG_PER_SECOND, REFUSAL_LOG_BURST, Instant::now())
    }
}

impl RefusalLogLimit {
    pub fn new(per_second: u32, burst: u32, now: Instant) -> Self {
        RefusalLogLimit {
            per_second: f64::from(per_second),
            burst: f64::from(burst.max(1)),
            bucket: Mutex::new(Bucket {
                tokens: f64::from(burst.max(1)),
                at: now,
                suppressed: 0,
            }),
        }
    }

    /// `Some(n)`: write this refusal line, and say `n` were suppressed since
    /// the last one written. `None`: suppress it (counted as rate_limited).
    pub fn admit(&self, now: Instant) -> Option<u64> {
        let mut b = self.bucket.lock().unwrap_or_else(|p| p.into_inner());
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * self.per_second).min(self.burst);
        b.at = now.max(b.at);
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            Some(std::mem::take(&mut b.suppressed))
        } else {
            b.suppressed += 1;
            drop(b);
            count_dropped(LineKind::refusal, DropReason::rate_limited);
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusal_lines_pass_a_burst_then_the_rate_and_report_what_was_suppressed() {
        let t0 = Instant::now();
        let limit = RefusalLogLimit::new(10, 3, t0);
        assert_eq!(limit.admit(t0), Some(0));
        assert_eq!(limit.admit(t0), Some(0));
        assert_eq!(limit.admit(t0), Some(0));
        assert_eq!(limit.admit(t0), None);
        assert_eq!(limit.admit(t0), None);
        // 100 ms at 10/s earns one line, which reports the two suppressed.
        let t1 = t0 + Duration::from_millis(100);
        assert_eq!(limit.admit(t1), Some(2));
        assert_eq!(limit.admit(t1), None);
        // A long pause refills only up to the burst.
        let t2 = t1 + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limit.admit(t2).is_some());
        }
        assert_eq!(limit.admit(t2), None);
    }

    /// A writer that blocks until told to go on, like a pipe nobody reads.
    struct Stalled(Arc<(Mutex<bool>, std::sync::Condvar)>, Arc<Mutex<Vec<u8>>>);
    use std::sync::Arc;

    impl std::io::Write for Stalled {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (open, cv) = &*self.0;
            let mut go = open.lock().unwrap();
            while !*go {
                go = cv.wait(go).unwrap();
            }
            self.1.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn a_stalled_sink_drops_lines_instead_of_blocking_the_writer() {
        let gate = Arc::new((Mutex::new(false), std::sync::Condvar::new()));
        let written = Arc::new(Mutex::new(Vec::new()));
        let (queue, guard) = Queue::start(4, Stalled(gate.clone(), written.clone()));
        let before = dropped(LineKind::issuance, DropReason::buffer_full);
        let started = Instant::now();
        for i in 0..100 {
            let mut w = Line {
                tx: &queue.tx,
                kind: LineKind::issuance,
            };
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        assert!(started.elapsed() < Duration::from_secs(5), "a write waited");
        // At most 4 queued and 1 in the stalled write: the rest were dropped.
        assert!(dropped(LineKind::issuance, DropReason::buffer_full) - before >= 95);
        *gate.0.lock().unwrap() = true;
        gate.1.notify_all();
        drop(guard);
        let text = String::from_utf8(written.lock().unwrap().clone()).unwrap();
        assert!(text.starts_with("line 0\n"), "{text}");
    }

    /// Counts the write calls that reach the sink.
    struct Counting(Arc<Mutex<(Vec<u8>, usize)>>);

    impl std::io::Write for Counting {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let mut seen = self.0.lock().unwrap();
            seen.0.extend_from_slice(buf);
            seen.1 += 1;
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_logged_together_reach_the_sink_in_order_and_in_few_writes() {
        let seen = Arc::new(Mutex::new((Vec::new(), 0)));
        let (queue, guard) = Queue::start(DEFAULT_BUFFER_LINES, Counting(seen.clone()));
        for i in 0..2000 {
            let mut w = Line {
                tx: &queue.tx,
                kind: LineKind::issuance,
            };
            w.write_all(format!("line {i}\n").as_bytes()).unwrap();
        }
        drop(guard);
        let (bytes, writes) = seen.lock().unwrap().clone();
        let expected: String = (0..2000).map(|i| format!("line {i}\n")).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), expected);
        // One write per line was the old cost (a syscall and a thread wake-up
        // each); batches of the writer's pause interval take a handful.
        assert!(writes <= 50, "{writes} writes for 2000 lines");
    }
}
