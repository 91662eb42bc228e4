//! What operators read: one [`snapshot`] of the maps feeds the stats
//! endpoint ([`http`]: /metrics, /stats, CSV, /healthz) and `mtlb status`.

pub mod bytes;
pub mod http;
pub mod server;
pub mod snapshot;
