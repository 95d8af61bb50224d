//! The replication stream's framing: backend messages split off a buffer
//! that fills in arbitrary pieces, CopyData decoded into XLogData and
//! keepalives.

use bytes::BytesMut;
use proptest::prelude::*;
use tributary_postgres::wire::{StreamMessage, split_stream_message};

/// A backend message of the replication stream, as the model holds it.
#[derive(Clone, Debug)]
enum Frame {
    XLogData {
        start: u64,
        end: u64,
        time: i64,
        payload: Vec<u8>,
    },
    KeepAlive {
        end: u64,
        time: i64,
        reply: u8,
    },
    /// NoticeResponse or ParameterStatus: skipped by the reader.
    Skipped {
        tag: u8,
        body: Vec<u8>,
    },
    /// CopyDone, CommandComplete or ReadyForQuery: the end of the stream.
    End {
        tag: u8,
        body: Vec<u8>,
    },
}

fn frame() -> impl Strategy<Value = Frame> {
    let body = || prop::collection::vec(any::<u8>(), 0..48);
    prop_oneof![
        (any::<u64>(), any::<u64>(), any::<i64>(), body()).prop_map(
            |(start, end, time, payload)| Frame::XLogData {
                start,
                end,
                time,
                payload
            }
        ),
        (any::<u64>(), any::<i64>(), any::<u8>()).prop_map(|(end, time, reply)| Frame::KeepAlive {
            end,
            time,
            reply
        }),
        (prop::sample::select(b"NS".to_vec()), body())
            .prop_map(|(tag, body)| Frame::Skipped { tag, body }),
        (prop::sample::select(b"cCZ".to_vec()), body())
            .prop_map(|(tag, body)| Frame::End { tag, body }),
    ]
}

fn encode(frame: &Frame, out: &mut Vec<u8>) {
    let (tag, body) = match frame {
        Frame::XLogData {
            start,
            end,
            time,
            payload,
        } => {
            let mut b = vec![b'w'];
            b.extend_from_slice(&start.to_be_bytes());
            b.extend_from_slice(&end.to_be_bytes());
            b.extend_from_slice(&time.to_be_bytes());
            b.extend_from_slice(payload);
            (b'd', b)
        }
        Frame::KeepAlive { end, time, reply } => {
            let mut b = vec![b'k'];
            b.extend_from_slice(&end.to_be_bytes());
            b.extend_from_slice(&time.to_be_bytes());
            b.push(*reply);
            (b'd', b)
        }
        Frame::Skipped { tag, body } | Frame::End { tag, body } => (*tag, body.clone()),
    };
    out.push(tag);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(&body);
}

/// What the reader must hand out for `frame`, if anything.
fn expected(frame: &Frame) -> Option<String> {
    match frame {
        Frame::XLogData { end, payload, .. } => Some(format!("xlog {end} {payload:?}")),
        Frame::KeepAlive { end, reply, .. } => Some(format!("keepalive {end} {}", *reply == 1)),
        Frame::Skipped { .. } => None,
        Frame::End { .. } => Some("end".to_owned()),
    }
}

fn describe(message: &StreamMessage) -> String {
    match message {
        StreamMessage::XLogData { wal_end, data } => format!("xlog {wal_end} {:?}", data.to_vec()),
        StreamMessage::KeepAlive { wal_end, reply } => format!("keepalive {wal_end} {reply}"),
        StreamMessage::End => "end".to_owned(),
    }
}

/// Every message complete in `buf`, until the first incomplete one or an
/// error; a frame of at least 5 bytes is consumed per message, so this ends.
fn drain(buf: &mut BytesMut, out: &mut Vec<String>) -> Result<(), String> {
    loop {
        match split_stream_message(buf) {
            Ok(Some(message)) => out.push(describe(&message)),
            Ok(None) => return Ok(()),
            Err(err) => return Err(err.to_string()),
        }
    }
}

proptest! {
    #![proptest_config(crate::seed::config())]

    #[test]
    fn frames_split_the_same_whatever_the_read_sizes(
        frames in prop::collection::vec(frame(), 0..12),
        cuts in prop::collection::vec(any::<prop::sample::Index>(), 0..12),
    ) {
        let mut bytes = Vec::new();
        for frame in &frames {
            encode(frame, &mut bytes);
        }
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        cuts.push(bytes.len());
        cuts.sort_unstable();
        let (mut buf, mut got, mut from) = (BytesMut::new(), Vec::new(), 0);
        for cut in cuts {
            buf.extend_from_slice(&bytes[from..cut]);
            from = cut;
            drain(&mut buf, &mut got).map_err(TestCaseError::fail)?;
        }
        let want: Vec<String> = frames.iter().filter_map(expected).collect();
        prop_assert_eq!(got, want);
        prop_assert!(buf.is_empty(), "{} bytes left over", buf.len());
    }

    #[test]
    fn arbitrary_stream_bytes_never_panic(
        frames in prop::collection::vec(frame(), 0..4),
        edits in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..6),
        noise in prop::collection::vec(any::<u8>(), 0..64),
        tag in prop::sample::select(b"dEcNSZ".to_vec()),
    ) {
        let mut bytes = Vec::new();
        for frame in &frames {
            encode(frame, &mut bytes);
        }
        for (at, byte) in edits {
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] = byte;
            }
        }
        // A frame of the chosen kind whose body is noise, then the noise raw.
        bytes.push(tag);
        bytes.extend_from_slice(&(noise.len() as u32 + 4).to_be_bytes());
        bytes.extend_from_slice(&noise);
        bytes.extend_from_slice(&noise);
        let mut buf = BytesMut::from(&bytes[..]);
        let _ = drain(&mut buf, &mut Vec::new());
    }
}
