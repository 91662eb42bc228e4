//! What operators read: one [`snapshot`] of the maps feeds the stats
//! endpoint and `mtlb status`. [`collector`] holds the endpoint's state
//! (maps' handles, shared byte readings, the sparklines' [`history`]);
//! [`http`] routes requests to the renderers: [`metrics`] (with
//! [`textfmt`] for readers of the older text format), [`csv`] and the HTML
//! [`page`] (with [`sparkline`] and [`units`]); [`server`] runs it all on
//! a thread of its own, with limits. [`table`] is `mtlb status`'s text.

pub mod bytes;
pub mod collector;
pub mod csv;
#[cfg(test)]
mod golden;
pub mod history;
pub mod http;
pub mod metrics;
pub mod page;
pub mod server;
pub mod snapshot;
pub mod sparkline;
pub mod table;
#[cfg(test)]
mod testutil;
pub mod textfmt;
pub mod units;

pub use collector::{AgentReport, Collector, CollectorError};
