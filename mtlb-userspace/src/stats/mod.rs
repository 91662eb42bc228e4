//! What operators read: one [`snapshot`] of the maps feeds the stats
//! endpoint ([`http`]: /metrics, /stats, CSV, /healthz) and `mtlb status`.
//! The page itself is [`page`] (with [`units`] and the sparklines'
//! [`history`]); [`textfmt`] is /metrics for readers of the older text
//! format.

pub mod bytes;
#[cfg(test)]
mod golden;
pub mod history;
pub mod http;
pub mod page;
pub mod server;
pub mod snapshot;
pub mod textfmt;
pub mod units;
