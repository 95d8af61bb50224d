//! Logs with `tracing`: JSON lines or pretty text, level from `[log]`.

use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::EnvFilter;

use crate::settings::{LogFormat, LogSettings};

/// Silences the SDK's own credential-chain warnings.
const QUIET_SDK: &str = "aws_config=error";

/// Set once JSON logging is installed.
static JSON: AtomicBool = AtomicBool::new(false);

/// True when logs are JSON lines (then a final error is a log line too).
pub fn is_json() -> bool {
    JSON.load(Ordering::Relaxed)
}

/// Installs the global subscriber; logs go to stderr.
pub fn init(settings: &LogSettings) {
    let mut filter = EnvFilter::try_new(&settings.level).unwrap_or_else(|_| EnvFilter::new("info"));
    if !settings.level.contains("aws_config") {
        // The SDK warns about every provider of the credential chain that
        // fails, with its Debug dump; the start-up check says it in one line.
        filter = filter.add_directive(QUIET_SDK.parse().expect("a valid directive"));
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match settings.format {
        LogFormat::Json => {
            let installed = builder
                .json()
                .flatten_event(true)
                .with_current_span(false)
                .with_span_list(false)
                .try_init();
            JSON.store(installed.is_ok(), Ordering::Relaxed);
            installed
        }
        LogFormat::Pretty => builder.with_ansi(false).compact().try_init(),
    };
    // A person at a terminal watches a snapshot's bar; a pipe or a log
    // collector gets the periodic progress lines alone.
    tributary_envelope::snapshot_progress::enable_progress_bar(
        !is_json() && std::io::IsTerminal::is_terminal(&std::io::stderr()),
    );
}
