//! `verify`'s reader of PostgreSQL tables: one REPEATABLE READ, read-only
//! transaction with the stream's session settings per consistent read,
//! every row read through the snapshot cursor and rendered by the
//! stream's decoder (an `op = "snapshot"` envelope), so values compare
//! byte for byte with what the stream carries.

use anyhow::Context as _;
use tokio_postgres::Client;
use tributary_postgres::catalog::Catalog;
use tributary_postgres::decoder::{Decoder, Transaction};
use tributary_postgres::replication::connect_sql;
use tributary_postgres::{PostgresSourceConfig, snapshot};

use super::{Captured, TableSource};
use crate::replica::Change;

/// The captured tables of a PostgreSQL source, read at consistent points.
pub struct PostgresTables {
    client: Client,
    decoder: Decoder,
    catalog: Catalog,
    captured_at: [u8; tributary_envelope::time::TIMESTAMP_LEN],
}

impl PostgresTables {
    /// Connects; the captured tables (`schema.table`) with the stream each
    /// routes to, and the reader.
    pub async fn connect(cfg: &PostgresSourceConfig) -> anyhow::Result<(Captured, Self)> {
        let client = connect_sql(&cfg.connection).await?;
        let db = cfg.connection.get_dbname().unwrap_or_default().to_owned();
        let tables = tributary_postgres::setup::matching_tables(&client, &cfg.filter)
            .await?
            .tables
            .into_iter()
            .map(|(schema, table)| {
                let stream = cfg.router.resolve(&cfg.name, &db, Some(&schema), &table);
                (format!("{schema}.{table}"), stream)
            })
            .collect();
        let captured = Captured {
            tables,
            default_scope: "public".into(),
        };
        let reader = Self {
            client,
            decoder: Decoder::new(&cfg.name, &db, cfg.router.clone(), cfg.filter.clone()),
            catalog: Catalog::default(),
            captured_at: tributary_envelope::time::now(),
        };
        Ok((captured, reader))
    }
}

impl TableSource for PostgresTables {
    async fn begin(&mut self) -> anyhow::Result<()> {
        snapshot::begin(&self.client, None).await?;
        Ok(())
    }

    async fn scan(&mut self, name: &str, each: &mut dyn FnMut(Change)) -> anyhow::Result<()> {
        let (schema, table) = name.split_once('.').unwrap_or(("public", name));
        let mut reader = snapshot::open_table(
            &self.client,
            &mut self.catalog,
            &mut self.decoder,
            (schema, table),
            None,
            snapshot::CHUNK_ROWS,
        )
        .await?;
        let mut tx = Transaction::begin(0, 0, 0);
        let mut decoded = Vec::with_capacity(snapshot::CHUNK_ROWS);
        loop {
            let read = reader
                .next_chunk(
                    &self.client,
                    &mut self.decoder,
                    &mut tx,
                    &self.captured_at,
                    &mut decoded,
                )
                .await?;
            if read == 0 {
                break;
            }
            decoded
                .drain(..)
                .filter_map(|record| Change::parse(&record.data))
                .for_each(&mut *each);
        }
        reader.close().await?;
        Ok(())
    }

    async fn end(&mut self) -> anyhow::Result<()> {
        self.client
            .batch_execute("COMMIT")
            .await
            .context("ending the consistent read")
    }
}
