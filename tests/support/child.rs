//! A child process that does not outlive its test: a failed assertion unwinds past the test's
//! own stop, and an `amibus run` left behind would keep its simulator and spool busy (and its
//! ports taken) for every test after it.

use std::ops::{Deref, DerefMut};
use std::process::Child;

/// Killed and reaped on drop, unless it has exited already.
pub struct KillOnDrop(pub Child);

impl Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}
