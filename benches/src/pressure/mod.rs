//! The pressure-test driver behind `tidegate-pressure`: scenarios, the open-loop runner and
//! the statistics it reports.

pub mod run;
pub mod scenario;
pub mod stats;
