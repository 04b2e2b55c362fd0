//! Abuse cases: http.

#[allow(unused_imports)]
use super::common;
