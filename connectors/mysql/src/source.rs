//! The MySQL source behind the pipeline's one [`Source`] contract: the
//! watermark is `binlog file index << 32 | offset`, and the offset store in
//! `[state] dir` keeps the file name and GTID state beside it.

use tributary_envelope::{Source, SourceContext, Stopped};

use crate::config::MysqlSourceConfig;
use crate::error::MysqlError;
use crate::replication::MysqlSource;

impl Source for MysqlSource {
    type Config = MysqlSourceConfig;
    type Error = MysqlError;

    const KIND: &'static str = "mysql";

    async fn connect(config: MysqlSourceConfig) -> Result<Self, MysqlError> {
        MysqlSource::connect(config).await
    }

    fn resume_watermark(&self) -> u64 {
        MysqlSource::resume_watermark(self)
    }

    fn starts_fresh(&self) -> bool {
        MysqlSource::starts_fresh(self)
    }

    async fn run(self, ctx: SourceContext) -> Result<Stopped, MysqlError> {
        MysqlSource::run(self, ctx).await
    }
}
