//! `amibus decode`: a raw AMI recording to JSON lines or protobuf envelopes.
//!
//! A user tool for inspecting captures, and a test hook: the real recordings decode with zero
//! parse errors. Reads with the same parser and encoder as the live path.

use std::io::{self, BufWriter, Read, Write};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::time::Instant;

use anyhow::Context;
use prost::Message;

use crate::ami::{Limits, ParseErrorRecord, Parsed, Parser, Record, Stamp, Stamped, record};
use crate::model::{self, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// One JSON object per line.
    Json,
    /// Length-delimited `amibus.v1.Envelope` messages (varint length, then the message).
    Proto,
    /// Parse and normalize only (for measuring).
    None,
}

/// Arguments of `amibus decode`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// The recording to read (raw AMI bytes as a server sent them; banner optional), or `-` for
    /// standard input.
    pub input: String,
    /// The server id to stamp on every record.
    #[arg(long, default_value = "recording")]
    pub server: String,
    #[arg(long, value_enum, default_value_t = Format::Json)]
    pub format: Format,
    /// The largest frame accepted; larger ones become parse_error records.
    #[arg(long, default_value_t = Limits::DEFAULT_MAX_FRAME_BYTES)]
    pub max_frame_bytes: usize,
    /// The most header lines per frame.
    #[arg(long, default_value_t = Limits::DEFAULT_MAX_HEADERS)]
    pub max_headers: usize,
}

/// What a decode run saw.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    pub frames: u64,
    pub bytes: u64,
    pub parse_errors: u64,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let started = Instant::now();
    let input: Box<dyn Read + Send> = if args.input == "-" {
        Box::new(io::stdin())
    } else {
        Box::new(
            std::fs::File::open(&args.input)
                .with_context(|| format!("cannot open recording {}", args.input))?,
        )
    };
    let stdout = io::stdout().lock();
    let mut out = BufWriter::with_capacity(1 << 20, stdout);
    let result = decode(input, &mut out, &args);
    let summary = match result {
        Ok(s) => {
            match out.flush() {
                Err(e) if e.kind() != io::ErrorKind::BrokenPipe => return Err(e.into()),
                _ => {}
            }
            s
        }
        Err(DecodeError::OutputClosed(s)) => s,
        Err(DecodeError::Input(e)) => {
            return Err(e).with_context(|| format!("cannot read {}", args.input));
        }
    };
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    eprintln!(
        "decoded {} frames, {} bytes, {} parse errors in {:.3} s ({:.1} MB/s, {:.0} frames/s)",
        summary.frames,
        summary.bytes,
        summary.parse_errors,
        secs,
        summary.bytes as f64 / secs / 1e6,
        summary.frames as f64 / secs
    );
    Ok(())
}

#[derive(Debug)]
pub enum DecodeError {
    Input(io::Error),
    /// The reader of our output went away (`| head`): not an error for the user.
    OutputClosed(Summary),
}

/// Bytes read per chunk.
const CHUNK: usize = 1 << 20;
/// Room kept before each chunk's bytes: a frame that a chunk's end cut is joined to the next
/// chunk by copying its start into that room, not the chunk after it.
const HEADROOM: usize = 64 << 10;

/// Chunk buffers in use at once: two read ahead, one being read into, one being parsed, one
/// on its way back.
const POOL: usize = 5;

/// A chunk read ahead: its bytes are `buf[HEADROOM..HEADROOM + len]`; `len == 0` at the end.
type Chunk = io::Result<(Vec<u8>, usize)>;

/// Read `input` a chunk at a time on its own thread, so that reading (a copy out of the page
/// cache: about a fifth of `--format none` on a large file) overlaps parsing. Two chunks are
/// read ahead at most. The buffers are a pool of [`POOL`], made once and handed back through
/// `spare` (a fresh megabyte per chunk cost as much again in page faults). The thread ends
/// after the last chunk or an error, or when the parser has gone (a closed output); until its
/// read returns, a blocked reader keeps no one waiting, since nothing joins it.
fn read_ahead(mut input: impl Read + Send + 'static) -> (Receiver<Chunk>, SyncSender<Vec<u8>>) {
    let (full, chunks) = sync_channel::<Chunk>(2);
    let (spare, spares) = sync_channel::<Vec<u8>>(POOL);
    std::thread::spawn(move || {
        let mut made = 0;
        loop {
            let mut buf = match spares.try_recv() {
                Ok(buf) => buf,
                Err(_) if made < POOL => {
                    made += 1;
                    vec![0; HEADROOM + CHUNK]
                }
                Err(_) => match spares.recv() {
                    Ok(buf) => buf,
                    Err(_) => return,
                },
            };
            let read = loop {
                match input.read(&mut buf[HEADROOM..]) {
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    other => break other,
                }
            };
            let last = !matches!(read, Ok(n) if n > 0);
            if full.send(read.map(|n| (buf, n))).is_err() || last {
                return;
            }
        }
    });
    (chunks, spare)
}

/// Decode everything `input` holds, writing records to `out` in `args.format`. `input` is read
/// on a thread of its own (see [`read_ahead`]).
///
/// # Errors
/// Reading the input fails, or the output is closed (with what was done so far).
pub fn decode(
    input: impl Read + Send + 'static,
    out: &mut impl Write,
    args: &Args,
) -> Result<Summary, DecodeError> {
    let (chunks, spare) = read_ahead(input);
    let mut parser = Parser::new(Limits {
        max_frame_bytes: args.max_frame_bytes,
        max_headers: args.max_headers,
    });
    let server: Arc<str> = Arc::from(args.server.as_str());
    let mut stamp = Stamp {
        server,
        epoch: 0,
        seq: 0,
        received_at_ns: 0,
    };
    let mut summary = Summary::default();
    // `buf[start..end]` holds unconsumed bytes; `pooled` says `buf` is a chunk of the pool
    // (else a frame joined by copy), to be handed back once parsed.
    let mut buf: Vec<u8> = Vec::new();
    let mut pooled = false;
    let mut start = 0;
    let mut end = 0;
    let mut scratch = Vec::with_capacity(4096);
    let mut eof = false;
    let mut emit = |stamped_bytes: &[u8], summary: &Summary| -> Result<(), DecodeError> {
        out.write_all(stamped_bytes)
            .map_err(|_| DecodeError::OutputClosed(*summary))
    };
    loop {
        // Parse everything buffered.
        loop {
            scratch.clear();
            let step = parser.parse(&buf[start..end]);
            match step {
                Parsed::Frame { frame, consumed } => {
                    summary.frames += 1;
                    summary.bytes += consumed as u64;
                    stamp.seq += 1;
                    let n = model::normalize(&frame);
                    match args.format {
                        Format::Json => json::write_frame_line(&stamp, &n, &frame, &mut scratch),
                        Format::Proto => {
                            let len = model::encoded_frame_len(&stamp, &n, &frame);
                            prost::encoding::encode_varint(len as u64, &mut scratch);
                            model::encode_frame(&stamp, &n, &frame, &mut scratch);
                        }
                        Format::None => {
                            std::hint::black_box(&n);
                        }
                    }
                    start += consumed;
                }
                Parsed::Skip { consumed, error } => {
                    summary.bytes += consumed as u64;
                    start += consumed;
                    if let Some(e) = error {
                        summary.parse_errors += 1;
                        stamp.seq += 1;
                        write_record(
                            &stamp,
                            Record::ParseError(e.into()),
                            args.format,
                            &mut scratch,
                        );
                    }
                }
                Parsed::Partial => break,
            }
            if !scratch.is_empty() {
                emit(&scratch, &summary)?;
            }
        }
        if eof {
            let rest = &buf[start..end];
            summary.bytes += rest.len() as u64;
            if rest.iter().any(|&b| b != b'\r' && b != b'\n') {
                summary.parse_errors += 1;
                stamp.seq += 1;
                scratch.clear();
                let record = Record::ParseError(ParseErrorRecord {
                    reason: "truncated",
                    message: format!("the input ended inside a frame ({} bytes)", rest.len()),
                });
                write_record(&stamp, record, args.format, &mut scratch);
                emit(&scratch, &summary)?;
            }
            return Ok(summary);
        }
        let (mut chunk, read) = match chunks.recv() {
            Ok(Ok(chunk)) => chunk,
            Ok(Err(e)) => return Err(DecodeError::Input(e)),
            Err(_) => {
                let e = io::Error::other("the reading thread stopped");
                return Err(DecodeError::Input(e));
            }
        };
        eof = read == 0;
        // The parser resumes on the unconsumed tail with the new bytes after it.
        let left = end - start;
        let spent = if left <= HEADROOM {
            chunk[HEADROOM - left..HEADROOM].copy_from_slice(&buf[start..end]);
            (start, end) = (HEADROOM - left, HEADROOM + read);
            std::mem::replace(&mut buf, chunk)
        } else {
            // A frame longer than the headroom so far (a large `Command` output): join by copy.
            let mut joined = Vec::with_capacity(left + read);
            joined.extend_from_slice(&buf[start..end]);
            joined.extend_from_slice(&chunk[HEADROOM..HEADROOM + read]);
            (start, end) = (0, joined.len());
            let _ = spare.try_send(chunk);
            std::mem::replace(&mut buf, joined)
        };
        if pooled {
            // The pool has room for every buffer it made, so this never drops one.
            let _ = spare.try_send(spent);
        }
        pooled = left <= HEADROOM;
        // One clock reading per read, as a connection stamps: every frame a read completes was
        // received then (a reading per frame cost ~25 ns, about a tenth of `--format none`).
        stamp.received_at_ns = record::now_ns();
    }
}

fn write_record(stamp: &Stamp, record: Record, format: Format, out: &mut Vec<u8>) {
    let stamped = Stamped {
        stamp: stamp.clone(),
        record,
    };
    let env = model::record_envelope(&stamped);
    match format {
        Format::Json => json::write_json_line(&env, out),
        Format::Proto => {
            prost::encoding::encode_varint(env.encoded_len() as u64, out);
            env.encode_raw(out);
        }
        Format::None => {}
    }
}
