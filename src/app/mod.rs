//! Wiring: the subcommands of the `amibus` binary. The only module that knows all the others.

pub mod decode;
pub mod sim;
