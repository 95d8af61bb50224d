//! The replication connection itself: startup, authentication (trust,
//! password, MD5, SCRAM-SHA-256), `START_REPLICATION`, the CopyBoth stream
//! and standby status updates, on `postgres-protocol` message codecs.
//!
//! It lives here, not in a worker task, so the streaming loop reads the
//! socket directly: one read hands the decoder every message that arrived,
//! with no per-message channel hop. During a burst the socket's
//! `SO_RCVLOWAT` is raised so the kernel wakes the reader once per 64 KiB
//! instead of once per TCP segment (the walsender flushes every message); a
//! short timer drops the mark again so a quiet stream is never held back.

use std::io;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, Bytes, BytesMut};
use fallible_iterator::FallibleIterator as _;
use postgres_protocol::authentication::md5_hash;
use postgres_protocol::authentication::sasl::{ChannelBinding, SCRAM_SHA_256, ScramSha256};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpStream, UnixStream};
use tokio_postgres::config::Host;

use crate::config::ConnectionConfig;
use crate::tls::TlsMode;

/// Bytes the kernel should gather before waking the reader during a burst.
const BURST_LOW_WATER: i32 = 64 * 1024;
/// The largest message the connection accepts: PostgreSQL allocates no
/// datum above 1 GiB, so a longer length is a corrupt frame, not data.
pub const MAX_MESSAGE_BYTES: usize = (1 << 30) + (1 << 20);
/// A read buffer grown past this by one large message is given back once
/// that message has been taken.
const KEEP_BUFFER_BYTES: usize = 8 << 20;
/// The read buffer's usual size.
const READ_BUFFER_BYTES: usize = 64 * 1024;
/// How long a burst read may wait for [`BURST_LOW_WATER`] bytes.
const BURST_WAIT: Duration = Duration::from_millis(2);

/// What a replication connection can fail with.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// Socket trouble.
    #[error("i/o error on the replication connection")]
    Io(#[from] io::Error),
    /// The server answered with an error.
    #[error("server error: {severity} {code}: {message}")]
    Server {
        /// ERROR, FATAL, ...
        severity: String,
        /// SQLSTATE.
        code: String,
        /// The message.
        message: String,
    },
    /// The server sent something this client does not expect.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A TLS file named in `source.url` cannot be used.
    #[error(transparent)]
    Tls(Box<crate::tls::TlsSetupError>),
    /// The server declined TLS and the URL's `sslmode` requires it.
    #[error("{0}")]
    TlsRefused(String),
}

impl WireError {
    /// True when the error is about credentials or privileges (retrying
    /// will not help).
    pub fn is_auth(&self) -> bool {
        matches!(self, WireError::Server { code, .. } if code == "28P01" || code == "28000" || code == "42501")
    }
}

/// One message of the replication stream.
#[derive(Debug)]
pub enum StreamMessage {
    /// A `pgoutput` message.
    XLogData {
        /// Server WAL end when it was sent.
        wal_end: u64,
        /// The `pgoutput` bytes.
        data: Bytes,
    },
    /// A keepalive.
    KeepAlive {
        /// Server WAL end.
        wal_end: u64,
        /// The server wants a status update now.
        reply: bool,
    },
    /// The server ended the stream.
    End,
}

enum Socket {
    Tcp(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Unix(UnixStream),
}

/// An open replication stream.
pub struct ReplicationConnection {
    socket: Socket,
    buf: BytesMut,
    out: BytesMut,
    low_water_raised: bool,
    burst: bool,
}

fn protocol(message: impl Into<String>) -> WireError {
    WireError::Protocol(message.into())
}

fn server_error(fields: postgres_protocol::message::backend::ErrorFields<'_>) -> WireError {
    let (mut severity, mut code, mut message) = (String::new(), String::new(), String::new());
    let mut fields = fields;
    while let Ok(Some(field)) = fields.next() {
        let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
        match field.type_() {
            b'S' => severity = value,
            b'C' => code = value,
            b'M' => message = value,
            _ => {}
        }
    }
    WireError::Server {
        severity,
        code,
        message,
    }
}

/// Quotes a name as a single-quoted option value.
fn quote_literal(value: &str) -> String {
    format!("'{}'", value.replace('\'', "''"))
}

impl ReplicationConnection {
    /// Connects, authenticates with `replication=database` and starts
    /// streaming `slot` (pgoutput, protocol 1) from `start` (0: the slot's
    /// confirmed position).
    pub async fn start(
        config: &ConnectionConfig,
        options: &str,
        application_name: &str,
        slot: &str,
        publication: &str,
        start: u64,
    ) -> Result<Self, WireError> {
        let mut conn = Self::open(config, options, application_name).await?;
        conn.start_replication(slot, publication, start).await?;
        Ok(conn)
    }

    /// Connects and authenticates with `replication=database`, ready for a
    /// replication command.
    pub async fn open(
        config: &ConnectionConfig,
        options: &str,
        application_name: &str,
    ) -> Result<Self, WireError> {
        // The whole handshake is bounded: a server that accepts the TCP
        // connection and then says nothing must not hang the source.
        let limit = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(crate::config::DEFAULT_CONNECT_TIMEOUT);
        match tokio::time::timeout(limit, Self::handshake(config, options, application_name)).await
        {
            Ok(conn) => conn,
            Err(_) => Err(WireError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {limit:?} (connect_timeout)"),
            ))),
        }
    }

    async fn handshake(
        config: &ConnectionConfig,
        options: &str,
        application_name: &str,
    ) -> Result<Self, WireError> {
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let socket = match config.get_hosts().first() {
            Some(Host::Unix(dir)) => {
                Socket::Unix(UnixStream::connect(dir.join(format!(".s.PGSQL.{port}"))).await?)
            }
            Some(Host::Tcp(host)) => {
                let tcp = TcpStream::connect((host.as_str(), port)).await?;
                tcp.set_nodelay(true)?;
                if config.get_keepalives() {
                    crate::sockopt::set_keepalive(
                        &tcp,
                        config.get_keepalives_idle(),
                        config
                            .get_keepalives_interval()
                            .unwrap_or(crate::config::KEEPALIVE_INTERVAL),
                        config
                            .get_keepalives_retries()
                            .unwrap_or(crate::config::KEEPALIVE_RETRIES),
                    )?;
                }
                if let Some(timeout) = config.get_tcp_user_timeout() {
                    crate::sockopt::set_user_timeout(&tcp, *timeout)?;
                }
                secure(tcp, config, host).await?
            }
            None => return Err(protocol("no host to connect to")),
        };
        let mut conn = Self {
            socket,
            buf: BytesMut::with_capacity(256 * 1024),
            out: BytesMut::with_capacity(1024),
            low_water_raised: false,
            burst: false,
        };
        let user = config.get_user().unwrap_or_default();
        let database = config.get_dbname().unwrap_or(user);
        frontend::startup_message(
            [
                ("user", user),
                ("database", database),
                ("replication", "database"),
                ("options", options),
                ("application_name", application_name),
                ("client_encoding", "UTF8"),
            ],
            &mut conn.out,
        )?;
        conn.flush().await?;
        conn.authenticate(user, config.get_password().unwrap_or_default())
            .await?;
        Ok(conn)
    }

    /// Creates the logical slot `slot` (pgoutput) and exports a snapshot of
    /// the database at its consistent point: returns (consistent point,
    /// snapshot name). The snapshot can be imported (`SET TRANSACTION
    /// SNAPSHOT`) only while this connection stays open and runs nothing
    /// else.
    pub async fn create_slot_exporting(&mut self, slot: &str) -> Result<(u64, String), WireError> {
        let sql = format!(
            "CREATE_REPLICATION_SLOT \"{}\" LOGICAL pgoutput (SNAPSHOT 'export')",
            slot.replace('"', "\"\"")
        );
        frontend::query(&sql, &mut self.out)?;
        self.flush().await?;
        let mut created = None;
        loop {
            match self.next_backend().await? {
                Message::DataRow(row) => {
                    let buffer = row.buffer();
                    let mut fields = Vec::new();
                    let mut ranges = row.ranges();
                    while let Some(range) = ranges.next()? {
                        let text = range
                            .and_then(|r| buffer.get(r))
                            .map(|b| String::from_utf8_lossy(b).into_owned());
                        fields.push(text);
                    }
                    // slot_name, consistent_point, snapshot_name, output_plugin
                    let point = fields.get(1).cloned().flatten();
                    let name = fields.get(2).cloned().flatten();
                    created = point
                        .as_deref()
                        .and_then(crate::lsn::Lsn::parse)
                        .zip(name)
                        .map(|(lsn, name)| (lsn.0, name));
                }
                Message::ReadyForQuery(_) => {
                    return created.ok_or_else(|| {
                        protocol("CREATE_REPLICATION_SLOT answered without a snapshot")
                    });
                }
                Message::ErrorResponse(body) => return Err(server_error(body.fields())),
                _ => {}
            }
        }
    }

    async fn start_replication(
        &mut self,
        slot: &str,
        publication: &str,
        start: u64,
    ) -> Result<(), WireError> {
        let conn = self;
        let sql = format!(
            "START_REPLICATION SLOT \"{}\" LOGICAL {:X}/{:X} (proto_version '1', publication_names {})",
            slot.replace('"', "\"\""),
            start >> 32,
            start & 0xFFFF_FFFF,
            quote_literal(&format!("\"{}\"", publication.replace('"', "\"\""))),
        );
        frontend::query(&sql, &mut conn.out)?;
        conn.flush().await?;
        loop {
            let Some((tag, frame)) = conn.next_frame()? else {
                if conn.read_some().await? == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "server closed the connection",
                    )
                    .into());
                }
                continue;
            };
            match tag {
                b'W' => return Ok(()), // CopyBothResponse
                b'E' => return Err(error_frame(frame)),
                b'N' | b'S' => {}
                other => {
                    return Err(protocol(format!(
                        "unexpected message {:?} in answer to START_REPLICATION",
                        other as char
                    )));
                }
            }
        }
    }

    /// Splits the next complete message (tag, whole frame) off the buffer.
    fn next_frame(&mut self) -> Result<Option<(u8, Bytes)>, WireError> {
        let frame = split_frame(&mut self.buf)?;
        self.settle_buffer(frame.as_ref().map_or(0, |(_, f)| f.len()))?;
        Ok(frame)
    }

    /// After `taken` bytes were split off the buffer: makes room for the
    /// whole of the partial frame it starts with when nothing was taken.
    fn settle_buffer(&mut self, taken: usize) -> Result<(), WireError> {
        if taken > KEEP_BUFFER_BYTES {
            // A large message grew the buffer, whose rest still shares the
            // message's allocation: move the rest to a buffer of its own so
            // the memory goes with the message.
            let mut rest = BytesMut::with_capacity(READ_BUFFER_BYTES.max(self.buf.len()));
            rest.extend_from_slice(&self.buf);
            self.buf = rest;
        } else if taken == 0
            && let Some(total) = frame_length(&self.buf)?
        {
            self.buf.reserve(total.saturating_sub(self.buf.len()));
        }
        Ok(())
    }

    async fn authenticate(&mut self, user: &str, password: &[u8]) -> Result<(), WireError> {
        let mut scram: Option<ScramSha256> = None;
        loop {
            match self.next_backend().await? {
                Message::AuthenticationOk => {}
                Message::AuthenticationCleartextPassword => {
                    frontend::password_message(password, &mut self.out)?;
                    self.flush().await?;
                }
                Message::AuthenticationMd5Password(body) => {
                    let hash = md5_hash(user.as_bytes(), password, body.salt());
                    frontend::password_message(hash.as_bytes(), &mut self.out)?;
                    self.flush().await?;
                }
                Message::AuthenticationSasl(body) => {
                    let mut mechanisms = body.mechanisms();
                    let mut supported = false;
                    while let Some(mechanism) = mechanisms.next()? {
                        supported |= mechanism == SCRAM_SHA_256;
                    }
                    if !supported {
                        return Err(protocol(
                            "the server offers no SASL mechanism this client supports",
                        ));
                    }
                    let client = ScramSha256::new(password, ChannelBinding::unsupported());
                    frontend::sasl_initial_response(
                        SCRAM_SHA_256,
                        client.message(),
                        &mut self.out,
                    )?;
                    self.flush().await?;
                    scram = Some(client);
                }
                Message::AuthenticationSaslContinue(body) => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| protocol("SASL continue without a start"))?;
                    client.update(body.data())?;
                    frontend::sasl_response(client.message(), &mut self.out)?;
                    self.flush().await?;
                }
                Message::AuthenticationSaslFinal(body) => {
                    let client = scram
                        .as_mut()
                        .ok_or_else(|| protocol("SASL final without a start"))?;
                    client.finish(body.data())?;
                }
                Message::ReadyForQuery(_) => return Ok(()),
                Message::ErrorResponse(body) => return Err(server_error(body.fields())),
                Message::ParameterStatus(_)
                | Message::BackendKeyData(_)
                | Message::NoticeResponse(_) => {}
                _ => return Err(protocol("unsupported authentication request")),
            }
        }
    }

    async fn next_backend(&mut self) -> Result<Message, WireError> {
        loop {
            if let Some(message) = Message::parse(&mut self.buf)? {
                return Ok(message);
            }
            if self.read_some().await? == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "server closed the connection",
                )
                .into());
            }
        }
    }

    async fn read_some(&mut self) -> io::Result<usize> {
        // Room for the rest of a partial frame (its whole length was
        // reserved when it began), else for a read's worth: asking for a
        // read's worth at the end of a large frame would reallocate it
        // (copying it into a buffer of twice its size) just to read its
        // last bytes.
        let want = match frame_length(&self.buf) {
            Ok(Some(total)) if total > self.buf.len() => total - self.buf.len(),
            _ => READ_BUFFER_BYTES,
        };
        self.buf.reserve(want.min(READ_BUFFER_BYTES));
        match &mut self.socket {
            Socket::Tcp(s) => s.read_buf(&mut self.buf).await,
            Socket::Tls(s) => s.read_buf(&mut self.buf).await,
            Socket::Unix(s) => s.read_buf(&mut self.buf).await,
        }
    }

    async fn flush(&mut self) -> io::Result<()> {
        let out = self.out.split();
        match &mut self.socket {
            Socket::Tcp(s) => s.write_all(&out).await,
            Socket::Tls(s) => {
                // TLS holds written bytes in its own buffer until flushed.
                s.write_all(&out).await?;
                s.flush().await
            }
            Socket::Unix(s) => s.write_all(&out).await,
        }
    }

    /// The next complete message already read, without waiting.
    pub fn next_message(&mut self) -> Result<Option<StreamMessage>, WireError> {
        let before = self.buf.len();
        let message = split_stream_message(&mut self.buf)?;
        self.settle_buffer(before - self.buf.len())?;
        Ok(message)
    }

    /// Waits for more bytes from the server. Cancel-safe. Returns false at
    /// end of stream.
    pub async fn fill(&mut self) -> Result<bool, WireError> {
        let n = if self.burst {
            self.set_low_water(BURST_LOW_WATER);
            match tokio::time::timeout(BURST_WAIT, self.read_some()).await {
                Ok(read) => read?,
                Err(_) => {
                    // Quiet for a moment: take whatever is there.
                    self.set_low_water(1);
                    self.read_some().await?
                }
            }
        } else {
            self.set_low_water(1);
            self.read_some().await?
        };
        // Data came: more is likely on its way, so gather it before waking.
        self.burst = n > 0;
        Ok(n > 0)
    }

    fn set_low_water(&mut self, bytes: i32) {
        let raise = bytes > 1;
        if raise == self.low_water_raised {
            return;
        }
        // On the TCP socket itself, under TLS too: TLS records arrive
        // whole or not at all, so the mark only batches them.
        let tcp = match &self.socket {
            Socket::Tcp(tcp) => Some(tcp),
            Socket::Tls(tls) => Some(tls.get_ref().0),
            Socket::Unix(_) => None,
        };
        if let Some(tcp) = tcp {
            // Best effort: without the option reads are merely smaller.
            let _ = crate::sockopt::set_receive_low_water(tcp, bytes);
        }
        self.low_water_raised = raise;
    }

    /// Sends a standby status update: everything up to `lsn` is written,
    /// flushed and applied.
    pub async fn send_status(&mut self, lsn: u64, reply: bool) -> Result<(), WireError> {
        let mut body = BytesMut::with_capacity(34);
        body.extend_from_slice(b"r");
        for _ in 0..3 {
            body.extend_from_slice(&lsn.to_be_bytes());
        }
        body.extend_from_slice(&pg_now_micros().to_be_bytes());
        body.extend_from_slice(&[u8::from(reply)]);
        frontend::CopyData::new(body.freeze())?.write(&mut self.out);
        Ok(self.flush().await?)
    }

    /// Ends the stream (CopyDone) and waits briefly for the server to
    /// confirm, then closes the connection.
    pub async fn close(mut self) -> Result<(), WireError> {
        // The server's last messages are small: do not wait for a burst.
        self.set_low_water(1);
        frontend::copy_done(&mut self.out);
        self.flush().await?;
        let drain = async {
            loop {
                match self.next_backend().await {
                    Ok(Message::ReadyForQuery(_)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(5), drain).await;
        frontend::terminate(&mut self.out);
        let _ = self.flush().await;
        Ok(())
    }
}

/// Asks for TLS (SSLRequest) when the URL's `sslmode` says so and wraps
/// the socket: `prefer` goes on in plain TCP when the server declines, the
/// stricter modes fail with the reason.
async fn secure(
    mut tcp: TcpStream,
    config: &ConnectionConfig,
    host: &str,
) -> Result<Socket, WireError> {
    if config.tls.mode == TlsMode::Disable {
        return Ok(Socket::Tcp(tcp));
    }
    let mut request = BytesMut::with_capacity(8);
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await?;
    match tcp.read_u8().await? {
        b'S' => {}
        b'N' if config.tls.mode == TlsMode::Prefer => return Ok(Socket::Tcp(tcp)),
        b'N' => return Err(WireError::TlsRefused(config.tls.refused_message())),
        other => {
            return Err(protocol(format!(
                "unexpected answer {:?} to the TLS request",
                other as char
            )));
        }
    }
    let client = crate::tls::client_config(&config.tls).map_err(|e| WireError::Tls(Box::new(e)))?;
    let tls = crate::tls::handshake(client, &config.tls, host, tcp).await?;
    Ok(Socket::Tls(Box::new(tls)))
}

/// The length of the backend message at the start of `buf` (tag and length
/// word included), once its 5-byte header has arrived.
fn frame_length(buf: &[u8]) -> Result<Option<usize>, WireError> {
    let Some(&[_, a, b, c, d]) = buf.get(..5) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes([a, b, c, d]) as usize;
    if !(4..=MAX_MESSAGE_BYTES).contains(&len) {
        return Err(protocol(format!(
            "invalid message length {len} (at most {MAX_MESSAGE_BYTES})"
        )));
    }
    Ok(Some(len + 1))
}

/// Splits the next complete backend message (tag, whole frame) off `buf`;
/// `None` while it is incomplete.
fn split_frame(buf: &mut BytesMut) -> Result<Option<(u8, Bytes)>, WireError> {
    match frame_length(buf)? {
        Some(total) if buf.len() >= total => {
            let frame = buf.split_to(total).freeze();
            Ok(Some((frame[0], frame)))
        }
        _ => Ok(None),
    }
}

/// The framing of the replication stream on bytes in memory: splits the next
/// complete message off `buf` (skipping notices and parameter changes) and
/// decodes it; `None` while the next one is incomplete. Pure, so the framing
/// is fuzzed without a socket.
pub fn split_stream_message(buf: &mut BytesMut) -> Result<Option<StreamMessage>, WireError> {
    loop {
        let Some((tag, frame)) = split_frame(buf)? else {
            return Ok(None);
        };
        return match tag {
            b'd' => parse_copy_data(frame.slice(5..)).map(Some),
            b'c' | b'C' | b'Z' => Ok(Some(StreamMessage::End)),
            b'E' => Err(error_frame(frame)),
            b'N' | b'S' => continue,
            other => Err(protocol(format!(
                "unexpected message {:?} in the replication stream",
                other as char
            ))),
        };
    }
}

/// The server error an ErrorResponse frame carries.
fn error_frame(frame: Bytes) -> WireError {
    let mut buf = BytesMut::from(&frame[..]);
    match Message::parse(&mut buf) {
        Ok(Some(Message::ErrorResponse(body))) => server_error(body.fields()),
        _ => protocol("malformed ErrorResponse"),
    }
}

fn parse_copy_data(mut bytes: Bytes) -> Result<StreamMessage, WireError> {
    if bytes.is_empty() {
        return Err(protocol("empty CopyData"));
    }
    match bytes.get_u8() {
        b'w' if bytes.len() >= 24 => {
            let _wal_start = bytes.get_u64();
            let wal_end = bytes.get_u64();
            let _server_time = bytes.get_i64();
            Ok(StreamMessage::XLogData {
                wal_end,
                data: bytes,
            })
        }
        b'k' if bytes.len() >= 17 => {
            let wal_end = bytes.get_u64();
            let _server_time = bytes.get_i64();
            let reply = bytes.get_u8() == 1;
            Ok(StreamMessage::KeepAlive { wal_end, reply })
        }
        tag => Err(protocol(format!("unexpected CopyData message {tag:#04x}"))),
    }
}

/// Microseconds since 2000-01-01, the protocol's clock.
fn pg_now_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    unix - tributary_envelope::time::POSTGRES_EPOCH_UNIX_MICROS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_data_frames() {
        let mut x = vec![b'w'];
        x.extend_from_slice(&1u64.to_be_bytes());
        x.extend_from_slice(&0x1234u64.to_be_bytes());
        x.extend_from_slice(&0i64.to_be_bytes());
        x.extend_from_slice(b"Bpayload");
        match parse_copy_data(Bytes::from(x)).unwrap() {
            StreamMessage::XLogData { wal_end, data } => {
                assert_eq!(wal_end, 0x1234);
                assert_eq!(&data[..], b"Bpayload");
            }
            other => panic!("{other:?}"),
        }
        let mut k = vec![b'k'];
        k.extend_from_slice(&9u64.to_be_bytes());
        k.extend_from_slice(&0i64.to_be_bytes());
        k.push(1);
        assert!(matches!(
            parse_copy_data(Bytes::from(k)).unwrap(),
            StreamMessage::KeepAlive {
                wal_end: 9,
                reply: true
            }
        ));
        assert!(parse_copy_data(Bytes::from_static(b"w\0\0")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"k")).is_err());
        assert!(parse_copy_data(Bytes::from_static(b"z")).is_err());
        assert_eq!(quote_literal("\"a'b\""), "'\"a''b\"'");
    }
}
