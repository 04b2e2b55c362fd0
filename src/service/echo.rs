//! TCP echo: every byte read is written back, in order.
//!
//! Stateless: the engine's backpressure bounds what a client that never reads can cost, and a
//! hand-over moves a connection with nothing of the service's (the engine carries its buffered
//! bytes).

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

    const HANDOVER_FORMAT: &'static str = "shardnet-echo/1";

    fn export(&mut self, _conn: &mut Conn<'_, ()>) -> Option<Vec<u8>> {
        Some(Vec::new())
    }

    fn import(&mut self, _conn: &mut Conn<'_, ()>, _blob: &[u8]) -> Result<(), String> {
        Ok(())
    }
}
