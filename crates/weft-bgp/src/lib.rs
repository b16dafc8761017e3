//! weft's BGP-4 speaker, our own code: the wire codec and the sans-IO session state machine
//! (inputs in, outputs out). The RIB, the tokio driver and the bgp backend build on them (issue 5).

pub mod codec;
pub mod driver;
pub mod fsm;
pub mod rib;

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_mp;
