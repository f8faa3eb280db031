//! One worker thread with a queue its owner can take back: the cache hands it the heads of each
//! layer that prefill is done with, and at the end builds what the worker has not started
//! itself, in parallel, instead of waiting for the queue to drain.

use std::collections::VecDeque;
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;

struct Queue<J> {
    jobs: VecDeque<J>,
    closed: bool,
}

struct Shared<J> {
    queue: Mutex<Queue<J>>,
    ready: Condvar,
}

/// A worker running `work` on the jobs submitted, in order, one at a time.
pub(crate) struct Worker<J: Send + 'static, R: Send + 'static> {
    shared: Arc<Shared<J>>,
    thread: Option<JoinHandle<Vec<R>>>,
}

impl<J: Send + 'static, R: Send + 'static> Worker<J, R> {
    /// Starts the thread (named `name`).
    pub(crate) fn spawn(name: &str, work: impl Fn(J) -> R + Send + 'static) -> std::io::Result<Self> {
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue { jobs: VecDeque::new(), closed: false }),
            ready: Condvar::new(),
        });
        let theirs = Arc::clone(&shared);
        let thread = std::thread::Builder::new().name(name.into()).spawn(move || {
            let mut done = Vec::new();
            loop {
                let job = {
                    let mut q = theirs.queue.lock().unwrap_or_else(PoisonError::into_inner);
                    loop {
                        if let Some(job) = q.jobs.pop_front() {
                            break job;
                        }
                        if q.closed {
                            return done;
                        }
                        q = theirs.ready.wait(q).unwrap_or_else(PoisonError::into_inner);
                    }
                };
                done.push(work(job));
            }
        })?;
        Ok(Self { shared, thread: Some(thread) })
    }

    /// Queues `job`.
    pub(crate) fn submit(&self, job: J) {
        self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner).jobs.push_back(job);
        self.shared.ready.notify_one();
    }

    /// Stops the worker: returns the jobs it had not started and, once the one in progress is
    /// done, the results of those it ran. `None` if the worker panicked (its jobs are lost).
    pub(crate) fn finish(mut self) -> Option<(Vec<J>, Vec<R>)> {
        let left: Vec<J> = {
            let mut q = self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
            q.closed = true;
            q.jobs.drain(..).collect()
        };
        self.shared.ready.notify_one();
        let done = self.thread.take()?.join().ok()?;
        Some((left, done))
    }
}

impl<J: Send + 'static, R: Send + 'static> Drop for Worker<J, R> {
    /// An unfinished worker (its owner failed mid-prefill) drops its queue and ends after the
    /// job in progress, detached.
    fn drop(&mut self) {
        let mut q = self.shared.queue.lock().unwrap_or_else(PoisonError::into_inner);
        q.closed = true;
        q.jobs.clear();
        self.shared.ready.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finish_returns_unstarted_jobs_and_results_of_the_rest() {
        // The first job blocks until the test has queued the others, so they are still queued
        // when `finish` takes them back.
        let gate = Arc::new(std::sync::Barrier::new(2));
        let g = Arc::clone(&gate);
        let w = Worker::spawn("test", move |j: u32| {
            if j == 0 {
                g.wait();
            }
            j * 10
        })
        .unwrap();
        for j in 0..5 {
            w.submit(j);
        }
        // The worker holds job 0 at the gate; the rest wait in the queue.
        let shared = Arc::clone(&w.shared);
        while shared.queue.lock().unwrap().jobs.len() != 4 {
            std::thread::yield_now();
        }
        // finish() closes the queue before the first job may end, so the worker takes no more.
        let finisher = std::thread::spawn(move || w.finish());
        while !shared.queue.lock().unwrap().closed {
            std::thread::yield_now();
        }
        gate.wait();
        let (left, done) = finisher.join().unwrap().unwrap();
        assert_eq!(done, vec![0]);
        assert_eq!(left, vec![1, 2, 3, 4]);
    }

    #[test]
    fn jobs_run_in_order_until_finished() {
        let w = Worker::spawn("test", |j: u32| j + 1).unwrap();
        for j in 0..3 {
            w.submit(j);
        }
        // Wait until the worker has taken every job.
        while !w.shared.queue.lock().unwrap().jobs.is_empty() {
            std::thread::yield_now();
        }
        let (left, done) = w.finish().unwrap();
        assert!(left.is_empty());
        assert_eq!(done, vec![1, 2, 3]);
    }

    #[test]
    fn a_panicking_worker_is_reported() {
        let w = Worker::spawn("test", |_: u32| -> u32 { panic!("boom") }).unwrap();
        w.submit(1);
        while !w.shared.queue.lock().unwrap().jobs.is_empty() {
            std::thread::yield_now();
        }
        assert!(w.finish().is_none());
    }
}
