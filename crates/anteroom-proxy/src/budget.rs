//! The cap on requests waiting in this proxy, in count and in bytes.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use anteroom_metrics::ProxyQueueMetrics;

/// Counts what waits; hands out reservations that give it back on drop.
#[derive(Debug)]
pub(crate) struct Budget {
    max_count: usize,
    max_bytes: usize,
    count: AtomicUsize,
    bytes: AtomicUsize,
    /// Follows `count` as the `anteroom_proxy_waiting_requests` gauge.
    metrics: ProxyQueueMetrics,
}

/// One waiting request's share of the budget.
pub(crate) struct Reservation {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Reservation {
    /// Bytes held.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Holds `more` bytes too, or says what is in use (and holds no more)
    /// when that would pass the cap.
    pub(crate) fn grow(&mut self, more: usize) -> Result<(), (usize, usize)> {
        let budget = &self.budget;
        let total = budget.bytes.fetch_add(more, Ordering::AcqRel) + more;
        if total > budget.max_bytes {
            budget.bytes.fetch_sub(more, Ordering::AcqRel);
            budget.metrics.shed();
            return Err((budget.count.load(Ordering::Acquire), total - more));
        }
        self.bytes += more;
        Ok(())
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.count.fetch_sub(1, Ordering::AcqRel);
        self.budget.bytes.fetch_sub(self.bytes, Ordering::AcqRel);
        self.budget.metrics.waiting(-1);
    }
}

impl Budget {
    pub(crate) fn new(max_count: usize, max_bytes: usize, metrics: ProxyQueueMetrics) -> Self {
        Self {
            max_count,
            max_bytes,
            count: AtomicUsize::new(0),
            bytes: AtomicUsize::new(0),
            metrics,
        }
    }

    /// Reserves room for one request of `bytes`, or says what is in use.
    pub(crate) fn reserve(self: &Arc<Self>, bytes: usize) -> Result<Reservation, (usize, usize)> {
        let count = self.count.fetch_add(1, Ordering::AcqRel) + 1;
        let total = self.bytes.fetch_add(bytes, Ordering::AcqRel) + bytes;
        if count > self.max_count || total > self.max_bytes {
            self.count.fetch_sub(1, Ordering::AcqRel);
            self.bytes.fetch_sub(bytes, Ordering::AcqRel);
            self.metrics.shed();
            return Err((count - 1, total - bytes));
        }
        self.metrics.waiting(1);
        Ok(Reservation {
            budget: Arc::clone(self),
            bytes,
        })
    }

    /// Requests waiting now (their bodies read or still arriving).
    pub(crate) fn waiting(&self) -> usize {
        self.count.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn count_and_bytes_are_capped_and_returned() {
        let budget = Arc::new(Budget::new(
            2,
            100,
            anteroom_metrics::ProxyMetrics::default().queue("q"),
        ));
        let a = budget.reserve(60).unwrap();
        assert!(budget.reserve(50).is_err(), "bytes over the cap");
        let b = budget.reserve(40).unwrap();
        assert!(budget.reserve(0).is_err(), "count over the cap");
        assert_eq!(budget.waiting(), 2);
        drop(a);
        drop(b);
        assert_eq!(budget.waiting(), 0);
        let mut c = budget.reserve(10).unwrap();
        c.grow(80).unwrap();
        assert_eq!(c.bytes(), 90);
        assert!(c.grow(11).is_err(), "growing past the byte cap");
        assert_eq!(c.bytes(), 90, "a refused growth holds nothing more");
        c.grow(10).unwrap();
        drop(c);
        let _d = budget.reserve(100).unwrap();
    }
}
