//! The cap on requests waiting in this proxy, in count and in bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts what waits; hands out reservations that give it back on drop.
#[derive(Debug)]
pub(crate) struct Budget {
    max_count: usize,
    max_bytes: usize,
    count: AtomicUsize,
    bytes: AtomicUsize,
}

/// One waiting request's share of the budget.
pub(crate) struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.count.fetch_sub(1, Ordering::AcqRel);
        self.budget.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
    }
}

impl Budget {
    pub(crate) fn new(max_count: usize, max_bytes: usize) -> Self {
        Self {
            max_count,
            max_bytes,
            count: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
        }
    }

    /// Reserves room for one request of `bytes`, or says what is in use.
    pub(crate) fn reserve(self: &Arc<Self>, bytes: usize) -> Result<Reservation, (usize, usize)> {
        let count = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        let total = self.bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        let reservation = Reservation {
            budget: Arc::clone(self),
            bytes,
        };
        if count > self.max_count || total > self.max_bytes {
            drop(reservation);
            return Err((count - 1, total - bytes));
        }
        Ok(reservation)
    }

    /// Requests waiting now.
    pub(crate) fn waiting(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_and_bytes_are_capped_and_returned() {
        let budget = Arc::new(Budget::new(2, 100));
        let a = budget.reserve(60).unwrap();
        assert!(budget.reserve(50).is_err(), "bytes over the cap");
        let b = budget.reserve(40).unwrap();
        assert!(budget.reserve(0).is_err(), "count over the cap");
        assert_eq!(budget.waiting(), 2);
        drop(a);
        drop(b);
        assert_eq!(budget.waiting(), 0);
        let _c = budget.reserve(100).unwrap();
    }
}
