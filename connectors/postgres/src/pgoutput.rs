//! Parser for the `pgoutput` logical replication messages (protocol version 1)
//! that arrive inside XLogData: Relation, Type, Insert, Update, Delete,
//! Truncate and Origin. Begin and Commit are parsed by the transport.
//!
//! Bytes come from the server: every read is bounds-checked and a malformed
//! message is a typed [`ProtocolError`], never a panic.

use thiserror::Error;

/// A malformed `pgoutput` message.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProtocolError {
    /// The message ended before a field.
    #[error("pgoutput message truncated while reading {0}")]
    Truncated(&'static str),
    /// A byte that is not valid where it stands.
    #[error("unexpected byte {byte:#04x} in pgoutput {context}")]
    Unexpected {
        /// What was being read.
        context: &'static str,
        /// The byte found.
        byte: u8,
    },
    /// A name that is not UTF-8.
    #[error("pgoutput {0} is not valid UTF-8")]
    NotUtf8(&'static str),
}

/// One column of a Relation message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RelationColumn {
    /// Part of the replica identity (all columns for REPLICA IDENTITY FULL).
    pub is_identity: bool,
    /// Column name.
    pub name: String,
    /// Type OID.
    pub type_oid: u32,
    /// Type modifier.
    pub type_modifier: i32,
}

/// A Relation message: the shape of a table, sent before its first change
/// in a session and again after DDL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Relation {
    /// The table's OID.
    pub id: u32,
    /// Schema name.
    pub schema: String,
    /// Table name.
    pub table: String,
    /// Replica identity setting: `d` default, `n` nothing, `f` full, `i` index.
    pub replica_identity: u8,
    /// Columns in attribute order.
    pub columns: Vec<RelationColumn>,
}

/// One column value of a tuple.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cell<'a> {
    /// SQL NULL.
    Null,
    /// An unchanged TOAST value the server did not send.
    Unchanged,
    /// A value in text format.
    Text(&'a [u8]),
    /// A value in binary format.
    Binary(&'a [u8]),
}

/// The column values of one row, validated but not split: iterate with
/// [`Tuple::iter`] (no allocation per row).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuple<'a> {
    columns: u16,
    /// The cells as pgoutput encodes them, or (with `spans`) the text the
    /// spans cut the values from.
    bytes: &'a [u8],
    spans: Option<&'a [TextSpan]>,
}

/// One text value of a [`Tuple::from_spans`]: its place in the tuple's
/// bytes, or `None` for SQL NULL.
pub type TextSpan = Option<std::ops::Range<usize>>;

impl<'a> Tuple<'a> {
    /// A tuple of text values cut from `bytes` by `spans`, one per column
    /// (what a snapshot reads: a row that was never a pgoutput message).
    pub fn from_spans(bytes: &'a [u8], spans: &'a [TextSpan]) -> Self {
        Self {
            columns: u16::try_from(spans.len()).unwrap_or(u16::MAX),
            bytes,
            spans: Some(spans),
        }
    }

    /// Number of columns.
    pub fn len(&self) -> usize {
        usize::from(self.columns)
    }

    /// The bytes of the tuple's cells as sent (about the size of their
    /// rendered JSON).
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// True for a tuple without columns.
    pub fn is_empty(&self) -> bool {
        self.columns == 0
    }

    /// The cells in column order.
    pub fn iter(&self) -> TupleIter<'a> {
        let remaining = self.columns;
        TupleIter(match self.spans {
            Some(spans) => Cells::Spans {
                bytes: self.bytes,
                spans: spans[..usize::from(remaining)].iter(),
            },
            None => Cells::Encoded {
                remaining,
                reader: Reader { bytes: self.bytes },
            },
        })
    }
}

/// Iterator over the cells of a [`Tuple`].
pub struct TupleIter<'a>(Cells<'a>);

enum Cells<'a> {
    Encoded {
        remaining: u16,
        reader: Reader<'a>,
    },
    Spans {
        bytes: &'a [u8],
        spans: std::slice::Iter<'a, TextSpan>,
    },
}

impl<'a> Iterator for TupleIter<'a> {
    type Item = Cell<'a>;

    fn next(&mut self) -> Option<Cell<'a>> {
        match &mut self.0 {
            Cells::Encoded { remaining, reader } => {
                if *remaining == 0 {
                    return None;
                }
                *remaining -= 1;
                // The bytes were validated when the tuple was parsed.
                reader.cell().ok()
            }
            Cells::Spans { bytes, spans } => Some(match spans.next()? {
                None => Cell::Null,
                Some(range) => {
                    // `snapshot::copy_text::split` cuts spans inside the bytes.
                    debug_assert!(range.end <= bytes.len(), "span {range:?} past the bytes");
                    bytes.get(range.clone()).map_or(Cell::Null, Cell::Text)
                }
            }),
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let remaining = match &self.0 {
            Cells::Encoded { remaining, .. } => usize::from(*remaining),
            Cells::Spans { spans, .. } => spans.len(),
        };
        (remaining, Some(remaining))
    }
}

/// A message the decoder acts on.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// A transaction starts (it committed at `final_lsn`).
    Begin {
        /// The commit's LSN.
        final_lsn: u64,
        /// Commit time, microseconds since 2000-01-01.
        commit_time: i64,
        /// Transaction id.
        xid: u32,
    },
    /// A transaction ends.
    Commit {
        /// The commit's LSN.
        commit_lsn: u64,
        /// The LSN just past the commit: what is acknowledged.
        end_lsn: u64,
    },
    /// Table shape.
    Relation(Relation),
    /// A type's name (sent for non-builtin types).
    Type {
        /// Type OID.
        oid: u32,
        /// Schema.
        schema: String,
        /// Name.
        name: String,
    },
    /// A new row.
    Insert {
        /// Table OID.
        relation: u32,
        /// The new row.
        new: Tuple<'a>,
    },
    /// A changed row.
    Update {
        /// Table OID.
        relation: u32,
        /// The old row: key columns (`K`) or the full row (`O`), when sent.
        old: Option<(OldKind, Tuple<'a>)>,
        /// The new row.
        new: Tuple<'a>,
    },
    /// A deleted row.
    Delete {
        /// Table OID.
        relation: u32,
        /// The old row: key columns (`K`) or the full row (`O`).
        old: (OldKind, Tuple<'a>),
    },
    /// Tables truncated together.
    Truncate {
        /// Table OIDs.
        relations: Vec<u32>,
        /// Option bits: 1 cascade, 2 restart identity.
        options: u8,
    },
    /// A message kind the decoder does not act on (Origin, ...).
    Other(u8),
}

/// What an old tuple holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OldKind {
    /// Only the replica identity columns (others are null).
    Key,
    /// The full old row (REPLICA IDENTITY FULL).
    Full,
}

struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], ProtocolError> {
        if self.bytes.len() < n {
            return Err(ProtocolError::Truncated(what));
        }
        let (head, tail) = self.bytes.split_at(n);
        self.bytes = tail;
        Ok(head)
    }

    fn u8(&mut self, what: &'static str) -> Result<u8, ProtocolError> {
        Ok(self.take(1, what)?[0])
    }

    fn u16(&mut self, what: &'static str) -> Result<u16, ProtocolError> {
        let b = self.take(2, what)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, ProtocolError> {
        let b = self.take(8, what)?;
        let mut bytes = [0u8; 8];
        bytes.copy_from_slice(b);
        Ok(u64::from_be_bytes(bytes))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, ProtocolError> {
        let b = self.take(4, what)?;
        Ok(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn cstring(&mut self, what: &'static str) -> Result<String, ProtocolError> {
        let end = self
            .bytes
            .iter()
            .position(|&b| b == 0)
            .ok_or(ProtocolError::Truncated(what))?;
        let s =
            std::str::from_utf8(&self.bytes[..end]).map_err(|_| ProtocolError::NotUtf8(what))?;
        self.bytes = &self.bytes[end + 1..];
        Ok(s.to_owned())
    }

    fn cell(&mut self) -> Result<Cell<'a>, ProtocolError> {
        Ok(match self.u8("tuple column kind")? {
            b'n' => Cell::Null,
            b'u' => Cell::Unchanged,
            b't' => {
                let len = self.u32("text value length")? as usize;
                Cell::Text(self.take(len, "text value")?)
            }
            b'b' => {
                let len = self.u32("binary value length")? as usize;
                Cell::Binary(self.take(len, "binary value")?)
            }
            byte => {
                return Err(ProtocolError::Unexpected {
                    context: "tuple column kind",
                    byte,
                });
            }
        })
    }

    /// Validates one tuple and returns it unsplit.
    fn tuple(&mut self) -> Result<Tuple<'a>, ProtocolError> {
        let columns = self.u16("tuple column count")?;
        let start = self.bytes;
        for _ in 0..columns {
            self.cell()?;
        }
        let used = start.len() - self.bytes.len();
        Ok(Tuple {
            columns,
            bytes: &start[..used],
            spans: None,
        })
    }

    fn old_kind(byte: u8) -> Option<OldKind> {
        match byte {
            b'K' => Some(OldKind::Key),
            b'O' => Some(OldKind::Full),
            _ => None,
        }
    }
}

/// Parses one `pgoutput` message.
pub fn parse(bytes: &[u8]) -> Result<Message<'_>, ProtocolError> {
    let mut r = Reader { bytes };
    let tag = r.u8("message tag")?;
    Ok(match tag {
        b'B' => Message::Begin {
            final_lsn: r.u64("begin lsn")?,
            commit_time: r.u64("begin commit time")? as i64,
            xid: r.u32("begin xid")?,
        },
        b'C' => {
            let _flags = r.u8("commit flags")?;
            let commit_lsn = r.u64("commit lsn")?;
            let end_lsn = r.u64("commit end lsn")?;
            let _commit_time = r.u64("commit time")?;
            Message::Commit {
                commit_lsn,
                end_lsn,
            }
        }
        b'R' => {
            let id = r.u32("relation id")?;
            let schema = r.cstring("relation schema")?;
            let table = r.cstring("relation name")?;
            let replica_identity = r.u8("replica identity")?;
            let n = r.u16("relation column count")? as usize;
            let mut columns = Vec::with_capacity(n.min(1600));
            for _ in 0..n {
                let flags = r.u8("column flags")?;
                let name = r.cstring("column name")?;
                let type_oid = r.u32("column type")?;
                let type_modifier = r.u32("column type modifier")? as i32;
                columns.push(RelationColumn {
                    is_identity: flags & 1 == 1,
                    name,
                    type_oid,
                    type_modifier,
                });
            }
            Message::Relation(Relation {
                id,
                schema,
                table,
                replica_identity,
                columns,
            })
        }
        b'Y' => Message::Type {
            oid: r.u32("type oid")?,
            schema: r.cstring("type schema")?,
            name: r.cstring("type name")?,
        },
        b'I' => {
            let relation = r.u32("relation id")?;
            match r.u8("insert tuple kind")? {
                b'N' => Message::Insert {
                    relation,
                    new: r.tuple()?,
                },
                byte => {
                    return Err(ProtocolError::Unexpected {
                        context: "insert tuple kind",
                        byte,
                    });
                }
            }
        }
        b'U' => {
            let relation = r.u32("relation id")?;
            let mut kind = r.u8("update tuple kind")?;
            let mut old = None;
            if let Some(old_kind) = Reader::old_kind(kind) {
                old = Some((old_kind, r.tuple()?));
                kind = r.u8("update new tuple kind")?;
            }
            if kind != b'N' {
                return Err(ProtocolError::Unexpected {
                    context: "update tuple kind",
                    byte: kind,
                });
            }
            Message::Update {
                relation,
                old,
                new: r.tuple()?,
            }
        }
        b'D' => {
            let relation = r.u32("relation id")?;
            let kind = r.u8("delete tuple kind")?;
            let old_kind = Reader::old_kind(kind).ok_or(ProtocolError::Unexpected {
                context: "delete tuple kind",
                byte: kind,
            })?;
            Message::Delete {
                relation,
                old: (old_kind, r.tuple()?),
            }
        }
        b'T' => {
            let n = r.u32("truncate relation count")? as usize;
            let options = r.u8("truncate options")?;
            let mut relations = Vec::with_capacity(n.min(r.bytes.len() / 4));
            for _ in 0..n {
                relations.push(r.u32("truncate relation id")?);
            }
            Message::Truncate { relations, options }
        }
        other => Message::Other(other),
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// Builds pgoutput bytes for tests.
    #[derive(Default)]
    pub(crate) struct Bytes(pub Vec<u8>);

    impl Bytes {
        pub(crate) fn u8(mut self, v: u8) -> Self {
            self.0.push(v);
            self
        }
        pub(crate) fn u16(mut self, v: u16) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn u32(mut self, v: u32) -> Self {
            self.0.extend_from_slice(&v.to_be_bytes());
            self
        }
        pub(crate) fn cstr(mut self, s: &str) -> Self {
            self.0.extend_from_slice(s.as_bytes());
            self.0.push(0);
            self
        }
        pub(crate) fn text(self, s: &[u8]) -> Self {
            let mut b = self.u8(b't').u32(s.len() as u32);
            b.0.extend_from_slice(s);
            b
        }
    }

    #[test]
    fn parses_relation_and_changes() {
        let rel = Bytes::default()
            .u8(b'R')
            .u32(16384)
            .cstr("public")
            .cstr("orders")
            .u8(b'd')
            .u16(2)
            .u8(1)
            .cstr("id")
            .u32(20)
            .u32(u32::MAX)
            .u8(0)
            .cstr("note")
            .u32(25)
            .u32(u32::MAX);
        let Message::Relation(r) = parse(&rel.0).unwrap() else {
            panic!("not a relation")
        };
        assert_eq!(
            (r.id, r.schema.as_str(), r.table.as_str()),
            (16384, "public", "orders")
        );
        assert!(r.columns[0].is_identity && !r.columns[1].is_identity);
        assert_eq!(r.columns[1].type_modifier, -1);

        let upd = Bytes::default()
            .u8(b'U')
            .u32(16384)
            .u8(b'K')
            .u16(2)
            .text(b"1")
            .u8(b'n')
            .u8(b'N')
            .u16(2)
            .text(b"2")
            .u8(b'u');
        let Message::Update {
            relation: 16384,
            old: Some((OldKind::Key, old)),
            new,
        } = parse(&upd.0).unwrap()
        else {
            panic!("not an update with an old key")
        };
        assert_eq!(
            old.iter().collect::<Vec<_>>(),
            [Cell::Text(b"1"), Cell::Null]
        );
        assert_eq!(
            new.iter().collect::<Vec<_>>(),
            [Cell::Text(b"2"), Cell::Unchanged]
        );
        assert_eq!(new.len(), 2);

        let begin = Bytes::default()
            .u8(b'B')
            .u32(0)
            .u32(0x100)
            .u32(0)
            .u32(5)
            .u32(77);
        assert_eq!(
            parse(&begin.0).unwrap(),
            Message::Begin {
                final_lsn: 0x100,
                commit_time: 5,
                xid: 77
            }
        );
        let commit = Bytes::default()
            .u8(b'C')
            .u8(0)
            .u32(0)
            .u32(0x100)
            .u32(0)
            .u32(0x128)
            .u32(0)
            .u32(5);
        assert_eq!(
            parse(&commit.0).unwrap(),
            Message::Commit {
                commit_lsn: 0x100,
                end_lsn: 0x128
            }
        );
        let trunc = Bytes::default().u8(b'T').u32(2).u8(1).u32(7).u32(9);
        assert_eq!(
            parse(&trunc.0).unwrap(),
            Message::Truncate {
                relations: vec![7, 9],
                options: 1
            }
        );
    }

    #[test]
    fn every_truncation_of_valid_messages_is_an_error_not_a_panic() {
        let msgs = [
            Bytes::default()
                .u8(b'I')
                .u32(1)
                .u8(b'N')
                .u16(3)
                .text(b"hello")
                .u8(b'n')
                .u8(b'u'),
            Bytes::default().u8(b'D').u32(1).u8(b'O').u16(1).text(b"x"),
            Bytes::default()
                .u8(b'R')
                .u32(1)
                .cstr("s")
                .cstr("t")
                .u8(b'f')
                .u16(1)
                .u8(1)
                .cstr("c")
                .u32(23)
                .u32(0),
        ];
        for msg in msgs {
            assert!(parse(&msg.0).is_ok());
            for cut in 0..msg.0.len() {
                assert!(parse(&msg.0[..cut]).is_err(), "cut at {cut} parsed");
            }
        }
        assert!(matches!(
            parse(&Bytes::default().u8(b'I').u32(1).u8(b'X').0),
            Err(ProtocolError::Unexpected { .. })
        ));
        // A huge announced length must not allocate or panic.
        let huge = Bytes::default()
            .u8(b'I')
            .u32(1)
            .u8(b'N')
            .u16(1)
            .u8(b't')
            .u32(u32::MAX);
        assert_eq!(parse(&huge.0), Err(ProtocolError::Truncated("text value")));
        assert_eq!(parse(b"O\0\0"), Ok(Message::Other(b'O')));
    }
}
