//! Abuse cases: engine.

#[allow(unused_imports)]
use super::common;
