//! Bounded property tests of the decoders that read bytes a server wrote:
//! the `pgoutput` parser and the decoder behind it (`pgoutput.rs`), the
//! replication stream's framing (`wire.rs`) and the text-to-JSON renderers
//! (`types.rs`, with the escaping of `tributary_envelope::json`).
//!
//! Two kinds of property: arbitrary or mutated bytes never panic (a typed
//! error or an output, and rendered output is valid JSON), and well-formed
//! input comes out exactly as a model computed here says.
//!
//! Every test prints its seed; `TRIBUTARY_PROPTEST_SEED=<seed>` replays a
//! failure and `PROPTEST_CASES=<n>` runs more cases (see [`seed::config`]).
//! The `fuzz/` directory holds `cargo fuzz` targets for the same decoders.

mod pgoutput;
mod seed;
mod types;
mod wire;
