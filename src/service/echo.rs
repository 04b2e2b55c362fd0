//! TCP echo: every byte read is written back, in order.
//!
//! Stateless: the engine's backpressure bounds what a client that never reads can cost.

use super::{Conn, Service};

#[derive(Debug, Default)]
pub struct Echo;

impl Service for Echo {
    type State = ();
    type Command = ();

    fn on_data(&mut self, conn: &mut Conn<'_, ()>, input: &mut [u8]) -> usize {
        conn.write(input);
        input.len()
    }
}
