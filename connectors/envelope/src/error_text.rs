//! Errors as one line of text for logs and the final message: the error and
//! its causes, each text once.
//!
//! Every part of the dataflow reports failures through this, so that a user
//! reads the cause chain once. Library errors repeat their cause's text in
//! their own (`tcp connect error: Connection refused` above `Connection
//! refused`) and wrap it in words that say nothing (`dispatch failure`,
//! `service error`): both are left out. No `Debug` output is ever used.

use std::error::Error;

/// Error texts that only say an error happened; skipped in a chain.
const FILLER: [&str; 5] = [
    "dispatch failure",
    "service error",
    "io error",
    "unhandled error",
    "an error occurred while loading credentials",
];

/// `err` and its causes joined with `: `, each text once, without filler.
pub fn one_line(err: &(dyn Error + 'static)) -> String {
    let mut parts: Vec<String> = Vec::new();
    let mut next = Some(err);
    while let Some(e) = next {
        let text = e.to_string();
        let known = parts.iter().any(|p| p.contains(&text));
        if !text.is_empty() && !known && !FILLER.contains(&text.as_str()) {
            parts.push(text);
        }
        next = e.source();
    }
    if parts.is_empty() {
        err.to_string()
    } else {
        parts.join(": ")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Layer {
        text: &'static str,
        source: Option<Box<Layer>>,
    }

    impl std::fmt::Display for Layer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.text)
        }
    }

    impl Error for Layer {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.source.as_deref().map(|s| s as &(dyn Error + 'static))
        }
    }

    fn chain(texts: &[&'static str]) -> Layer {
        let mut layer: Option<Layer> = None;
        for text in texts.iter().rev() {
            layer = Some(Layer {
                text,
                source: layer.map(Box::new),
            });
        }
        layer.expect("at least one layer")
    }

    #[test]
    fn causes_are_printed_once_without_filler() {
        let err = chain(&[
            "dispatch failure",
            "io error",
            "client error (Connect): tcp connect error: Connection refused",
            "tcp connect error: Connection refused",
            "Connection refused",
        ]);
        assert_eq!(
            one_line(&err),
            "client error (Connect): tcp connect error: Connection refused"
        );
        let err = chain(&["starting replication", "server error: ERROR 55006: busy"]);
        assert_eq!(
            one_line(&err),
            "starting replication: server error: ERROR 55006: busy"
        );
        assert_eq!(one_line(&chain(&["service error"])), "service error");
    }
}
