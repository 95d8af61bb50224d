//! The type renderers: the first byte picks a kind (every built-in kind and
//! its array), the rest is the text value. Output must be valid JSON for
//! every kind but json/jsonb, which embed what the server validated.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tributary_postgres::types::ValueKind;

fn kind(selector: u8) -> ValueKind {
    let scalars = ValueKind::SCALARS;
    let scalar = scalars[usize::from(selector) % scalars.len()].clone();
    if usize::from(selector) / scalars.len() % 2 == 1 {
        ValueKind::Array(Box::new(scalar))
    } else {
        scalar
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&selector, text)) = data.split_first() else {
        return;
    };
    let kind = kind(selector);
    let mut out = Vec::new();
    tributary_postgres::types::render(&kind, text, &mut out);
    if let Err(err) = serde_json::from_slice::<serde_json::Value>(&out)
        && !kind.embeds_json()
    {
        panic!(
            "{kind:?} rendered invalid JSON {:?}: {err}",
            String::from_utf8_lossy(&out)
        );
    }
});
