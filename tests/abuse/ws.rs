//! Abuse cases: ws.

#[allow(unused_imports)]
use super::common;
