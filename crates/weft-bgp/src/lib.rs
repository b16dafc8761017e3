//! weft's BGP-4 speaker, our own code. This first part is the wire codec; the sans-IO session
//! state machine (events in, actions out), the RIB and the tokio driver build on it (issue 5).

pub mod codec;

#[cfg(test)]
mod tests;
