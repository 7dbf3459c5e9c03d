//! The control plane: what changes the live runtime, and what runs beside the request path.
//!
//! - [`config`]: reading the config file from disk (size limits, TLS file checks).
//! - [`reload`]: watching the file and swapping in validated rules without a restart.
//! - [`housekeep`]: limiter sweeps and the overload controller's windows.
//! - [`embedded`]: hosting the grab backend in-process.

pub mod config;
pub mod embedded;
pub mod history;
pub mod housekeep;
pub mod reload;
