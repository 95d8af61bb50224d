//! The replication stream's framing: any bytes split into backend messages
//! and decoded give messages, "incomplete" or a typed error, never a panic.

#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use tributary_postgres::wire::split_stream_message;

fuzz_target!(|data: &[u8]| {
    let mut buf = BytesMut::from(data);
    // Each message takes at least one 5-byte frame off the buffer.
    while let Ok(Some(_)) = split_stream_message(&mut buf) {}
});
