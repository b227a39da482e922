//! The file sink: payloads to a file or stdout, newline- or length-delimited, rotated by size.
//!
//! The framing follows `[pipeline] format` ([`Framing::for_format`]): JSON lines, or
//! length-delimited protobuf envelopes (a varint length, then one `amibus.v1.Envelope`).
//!
//! Owns: one writer thread per sink (file writes block), batching every record that is
//! waiting into one write and one flush, and acknowledging a batch only after its flush.
//! It is the embedded default, so `amibus run` works without any broker.
//!
//! Must never: acknowledge a record before the bytes were handed to the OS.

use std::fs::{self, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot};

use super::{Delivery, Record, Sink, SinkError};
use crate::model::PayloadFormat;

/// How records are separated in the output.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Framing {
    /// Each payload then `\n` (for JSON payloads); a payload already ending in `\n` gets none.
    Lines,
    /// A protobuf varint length, then the payload (`parseDelimitedFrom` in most libraries).
    LengthDelimited,
}

impl Framing {
    /// The framing a reader of `format` payloads expects: JSON is one object per line;
    /// protobuf is length-delimited, the standard framing of a stream of messages (what
    /// `amibus decode --format proto` writes, ClickHouse's `Protobuf` format and every
    /// library's delimited reader take). Newlines cannot separate protobuf: its bytes may hold
    /// any value, `\n` included.
    pub fn for_format(format: PayloadFormat) -> Framing {
        match format {
            PayloadFormat::Json => Framing::Lines,
            PayloadFormat::Proto => Framing::LengthDelimited,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FileSinkConfig {
    /// A file path, or `-` for standard output.
    pub path: String,
    pub framing: Framing,
    /// Rotate past this many bytes (0 = never): `out.jsonl` → `out.jsonl.1` → `out.jsonl.2` ...
    pub rotate_bytes: u64,
    /// How many rotated files to keep.
    pub keep: u32,
}

enum Command {
    Write(Bytes, oneshot::Sender<Result<(), SinkError>>),
    Flush(oneshot::Sender<()>),
}

/// See the module docs.
pub struct FileSink {
    tx: mpsc::Sender<Command>,
}

impl FileSink {
    /// Open the output and start the writer thread.
    ///
    /// # Errors
    /// The file cannot be opened.
    pub fn open(cfg: FileSinkConfig) -> io::Result<FileSink> {
        let out = Output::open(&cfg)?;
        let (tx, rx) = mpsc::channel(8192);
        std::thread::Builder::new()
            .name("amibus-file-sink".into())
            .spawn(move || writer_loop(cfg, out, rx))?;
        Ok(FileSink { tx })
    }
}

impl Sink for FileSink {
    fn name(&self) -> &'static str {
        "file"
    }

    async fn send(&mut self, record: &Record) -> Result<Delivery, SinkError> {
        let (done, acked) = oneshot::channel();
        self.tx
            .send(Command::Write(record.payload.clone(), done))
            .await
            .map_err(|_| SinkError::Retriable("file writer stopped".into()))?;
        Ok(Box::pin(async move {
            acked
                .await
                .unwrap_or_else(|_| Err(SinkError::Retriable("file writer stopped".into())))
        }))
    }

    async fn flush(&mut self, deadline: Duration) -> Result<(), SinkError> {
        let (done, flushed) = oneshot::channel();
        if self.tx.send(Command::Flush(done)).await.is_err() {
            return Err(SinkError::Retriable("file writer stopped".into()));
        }
        tokio::time::timeout(deadline, flushed)
            .await
            .map_err(|_| SinkError::Retriable("flush timed out".into()))?
            .map_err(|_| SinkError::Retriable("file writer stopped".into()))
    }
}

enum Target {
    Stdout(io::Stdout),
    File(File),
}

struct Output {
    w: BufWriter<Target>,
    written: u64,
}

impl Write for Target {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Target::Stdout(s) => s.write(buf),
            Target::File(f) => f.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Target::Stdout(s) => s.flush(),
            Target::File(f) => f.flush(),
        }
    }
}

impl Output {
    fn open(cfg: &FileSinkConfig) -> io::Result<Output> {
        let (target, written) = if cfg.path == "-" {
            (Target::Stdout(io::stdout()), 0)
        } else {
            let f = OpenOptions::new()
                .create(true)
                .append(true)
                .open(&cfg.path)?;
            let len = f.metadata()?.len();
            (Target::File(f), len)
        };
        Ok(Output {
            w: BufWriter::with_capacity(256 << 10, target),
            written,
        })
    }
}

fn rotated(path: &Path, n: u32) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(format!(".{n}"));
    PathBuf::from(s)
}

fn rotate(cfg: &FileSinkConfig, out: &mut Output) -> io::Result<()> {
    out.w.flush()?;
    let path = Path::new(&cfg.path);
    if cfg.keep == 0 {
        fs::remove_file(path)?;
    } else {
        let _ = fs::remove_file(rotated(path, cfg.keep));
        for n in (1..cfg.keep).rev() {
            let _ = fs::rename(rotated(path, n), rotated(path, n + 1));
        }
        fs::rename(path, rotated(path, 1))?;
    }
    *out = Output::open(cfg)?;
    Ok(())
}

fn frame(cfg: &FileSinkConfig, payload: &[u8], w: &mut impl Write) -> io::Result<u64> {
    match cfg.framing {
        Framing::Lines => {
            w.write_all(payload)?;
            if payload.last() == Some(&b'\n') {
                Ok(payload.len() as u64)
            } else {
                w.write_all(b"\n")?;
                Ok(payload.len() as u64 + 1)
            }
        }
        Framing::LengthDelimited => {
            let mut len = Vec::with_capacity(10);
            prost::encoding::encode_varint(payload.len() as u64, &mut len);
            w.write_all(&len)?;
            w.write_all(payload)?;
            Ok((len.len() + payload.len()) as u64)
        }
    }
}

fn writer_loop(cfg: FileSinkConfig, mut out: Output, mut rx: mpsc::Receiver<Command>) {
    let mut batch = Vec::new();
    let mut flushes = Vec::new();
    while let Some(first) = rx.blocking_recv() {
        let mut next = Some(first);
        while let Some(cmd) = next.take() {
            match cmd {
                Command::Write(p, done) => batch.push((p, done)),
                Command::Flush(done) => flushes.push(done),
            }
            if batch.len() < 4096 {
                next = rx.try_recv().ok();
            }
        }
        let mut result = Ok(());
        for (payload, _) in &batch {
            if result.is_err() {
                break;
            }
            result = frame(&cfg, payload, &mut out.w).map(|n| out.written += n);
            if result.is_ok()
                && cfg.rotate_bytes > 0
                && cfg.path != "-"
                && out.written >= cfg.rotate_bytes
            {
                result = rotate(&cfg, &mut out);
            }
        }
        let result = result.and_then(|()| out.w.flush());
        let outcome = result.map_err(|e| SinkError::Retriable(format!("{}: {e}", cfg.path)));
        for (_, done) in batch.drain(..) {
            let _ = done.send(outcome.clone());
        }
        for done in flushes.drain(..) {
            let _ = done.send(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(payload: &'static [u8]) -> Record {
        Record {
            key: Bytes::new(),
            meta: Default::default(),
            payload: Bytes::from_static(payload),
        }
    }

    #[tokio::test]
    async fn lines_are_acknowledged_after_the_write_and_rotate() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.jsonl");
        let mut sink = FileSink::open(FileSinkConfig {
            path: path.to_string_lossy().into_owned(),
            framing: Framing::Lines,
            rotate_bytes: 20,
            keep: 2,
        })
        .expect("open");
        let mut deliveries = Vec::new();
        for p in [
            &b"{\"a\":1}"[..],
            b"{\"b\":2}\n",
            b"{\"c\":3}",
            b"{\"d\":4}",
        ] {
            deliveries.push(sink.send(&record(p)).await.expect("queued"));
        }
        for d in deliveries {
            d.await.expect("acknowledged");
        }
        sink.flush(Duration::from_secs(5)).await.expect("flush");
        let first = fs::read_to_string(rotated(&path, 1)).expect("rotated file");
        assert_eq!(first, "{\"a\":1}\n{\"b\":2}\n{\"c\":3}\n");
        assert_eq!(fs::read_to_string(&path).expect("current"), "{\"d\":4}\n");
    }

    #[tokio::test]
    async fn length_delimited_framing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("out.bin");
        let mut sink = FileSink::open(FileSinkConfig {
            path: path.to_string_lossy().into_owned(),
            framing: Framing::LengthDelimited,
            rotate_bytes: 0,
            keep: 0,
        })
        .expect("open");
        sink.send(&record(b"abc"))
            .await
            .expect("queued")
            .await
            .expect("acked");
        assert_eq!(fs::read(&path).expect("file"), b"\x03abc");
    }

    #[tokio::test]
    async fn an_unwritable_path_is_an_error() {
        let err = FileSink::open(FileSinkConfig {
            path: "/nonexistent-dir/x/out".into(),
            framing: Framing::Lines,
            rotate_bytes: 0,
            keep: 0,
        });
        assert!(err.is_err());
    }
}
