//! A small persistent thread pool for the fine-grained parallel loops of a decode step.
//!
//! A decode token runs a few hundred matrix-vector products of tens of microseconds each. A
//! general work-stealing pool puts its idle threads to sleep within microseconds, so every
//! product pays a wake-up (a futex call and a context switch) that costs about as much as the
//! product itself. Here the workers spin for a while after each loop (a few hundred
//! microseconds) before parking, like ggml's thread pool: loops
//! that follow each other closely start without a wake-up. Tasks are claimed from an atomic
//! counter, so uneven tasks balance. A loop started while another runs (from another thread,
//! or nested) runs on the calling thread alone.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread;
use std::time::{Duration, Instant};

/// How long an idle worker spins before it parks.
const SPIN: Duration = Duration::from_micros(300);

/// The loop being run, its lifetime erased: valid while `Pool::run` waits for the workers.
#[derive(Clone, Copy)]
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    tasks: usize,
}

// SAFETY: the closure is `Sync` and outlives every use (`run` returns only after all workers
// have finished the job).
unsafe impl Send for Job {}

struct Shared {
    /// Incremented per job; a worker runs each new epoch once.
    epoch: AtomicUsize,
    job: Mutex<Option<Job>>,
    next: AtomicUsize,
    /// Workers still inside the current job.
    active: AtomicUsize,
    panicked: AtomicBool,
    sleeping: Mutex<usize>,
    wake: Condvar,
}

/// The pool: `threads - 1` workers plus the calling thread.
pub struct Pool {
    shared: Arc<Shared>,
    workers: usize,
    busy: Mutex<()>,
}

impl Pool {
    /// The process-wide pool, sized like rayon's global pool (`RAYON_NUM_THREADS` or the
    /// number of CPUs), started on first use.
    pub fn global() -> &'static Pool {
        static POOL: OnceLock<Pool> = OnceLock::new();
        POOL.get_or_init(|| Pool::new(rayon::current_num_threads()))
    }

    /// A pool of `threads` threads in all (the caller counts as one).
    pub fn new(threads: usize) -> Pool {
        let shared = Arc::new(Shared {
            epoch: AtomicUsize::new(0),
            job: Mutex::new(None),
            next: AtomicUsize::new(0),
            active: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            sleeping: Mutex::new(0),
            wake: Condvar::new(),
        });
        let workers = threads.max(1) - 1;
        for i in 0..workers {
            let s = Arc::clone(&shared);
            let spawned = thread::Builder::new().name(format!("needle-pool-{i}")).spawn(move || worker(&s));
            if spawned.is_err() {
                // Fewer threads than asked: the loops still complete (the caller claims tasks).
                return Pool { shared, workers: i, busy: Mutex::new(()) };
            }
        }
        Pool { shared, workers, busy: Mutex::new(()) }
    }

    /// Threads a loop runs on (workers and the caller).
    pub fn threads(&self) -> usize {
        self.workers + 1
    }

    /// Calls `f(i)` for every `i` in `0..tasks`, spread over the pool; returns when all are done.
    /// Runs on the calling thread alone when the pool is busy or has no workers.
    /// A panic in `f` is re-raised here.
    pub fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        let guard = match self.busy.try_lock() {
            Ok(g) if self.workers > 0 && tasks > 1 => g,
            _ => return (0..tasks).for_each(f),
        };
        let s = &*self.shared;
        // SAFETY (lifetime erasure): the job is cleared and every worker has left it before
        // this function returns, so `f` is never used after its borrow ends.
        let f = unsafe { std::mem::transmute::<&(dyn Fn(usize) + Sync), *const (dyn Fn(usize) + Sync + 'static)>(f) };
        *lock(&s.job) = Some(Job { f, tasks });
        s.next.store(0, Ordering::Relaxed);
        s.active.store(self.workers, Ordering::Relaxed);
        s.epoch.fetch_add(1, Ordering::Release);
        if *lock(&s.sleeping) > 0 {
            s.wake.notify_all();
        }
        // SAFETY: `f` is the caller's live closure.
        let ok = catch_unwind(AssertUnwindSafe(|| claim(s, unsafe { &*f }, tasks))).is_ok();
        while s.active.load(Ordering::Acquire) > 0 {
            std::hint::spin_loop();
        }
        *lock(&s.job) = None;
        drop(guard);
        if !ok || s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a task of a needle-kernels-cpu parallel loop panicked");
        }
    }
}

impl Pool {
    /// `f(i, &mut items[i])` for every item, spread over the pool like [`Pool::run`]; returns
    /// the results in the items' order. For the per-head loops of a decode step: on the same
    /// threads as the matrix products around them, so no second pool competes for the cores.
    pub fn map_mut<T: Send, R: Send>(&self, items: &mut [T], f: impl Fn(usize, &mut T) -> R + Sync) -> Vec<R> {
        let n = items.len();
        // One lock per item, uncontended: task `i` alone takes lock `i`.
        let cells: Vec<Mutex<(&mut T, Option<R>)>> = items.iter_mut().map(|t| Mutex::new((t, None))).collect();
        self.run(n, &|i| {
            let mut cell = lock(&cells[i]);
            let r = f(i, &mut *cell.0);
            cell.1 = Some(r);
        });
        // `run` returns after every task ran once (a panic is re-raised before this point).
        cells.into_iter().filter_map(|c| c.into_inner().unwrap_or_else(|e| e.into_inner()).1).collect()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

fn claim(s: &Shared, f: &(dyn Fn(usize) + Sync), tasks: usize) {
    loop {
        let i = s.next.fetch_add(1, Ordering::Relaxed);
        if i >= tasks {
            return;
        }
        f(i);
    }
}

fn worker(s: &Shared) {
    // Epoch 0 is "no job yet": a worker that starts after the first job was posted still runs it.
    let mut seen = 0;
    loop {
        let (start, mut spins) = (Instant::now(), 0u32);
        while s.epoch.load(Ordering::Acquire) == seen {
            spins = spins.wrapping_add(1);
            if !spins.is_multiple_of(256) || start.elapsed() < SPIN {
                std::hint::spin_loop();
                continue;
            }
            let mut sleeping = lock(&s.sleeping);
            *sleeping += 1;
            while s.epoch.load(Ordering::Acquire) == seen {
                sleeping = s.wake.wait(sleeping).unwrap_or_else(|e| e.into_inner());
            }
            *sleeping -= 1;
        }
        seen = s.epoch.load(Ordering::Acquire);
        if let Some(job) = *lock(&s.job) {
            // SAFETY: see `Job`: `run` keeps the closure alive until `active` drops to 0.
            let f = unsafe { &*job.f };
            if catch_unwind(AssertUnwindSafe(|| claim(s, f, job.tasks))).is_err() {
                s.panicked.store(true, Ordering::Relaxed);
            }
        }
        s.active.fetch_sub(1, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};

    use super::Pool;

    #[test]
    fn every_task_runs_once_across_many_loops() {
        let pool = Pool::new(3);
        for tasks in [0, 1, 2, 7, 100] {
            for _ in 0..50 {
                let hits: Vec<AtomicU64> = (0..tasks).map(|_| AtomicU64::new(0)).collect();
                pool.run(tasks, &|i| {
                    hits[i].fetch_add(1, Ordering::Relaxed);
                });
                assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "{tasks} tasks");
            }
        }
    }

    #[test]
    fn nested_and_concurrent_loops_complete_on_the_caller() {
        let pool = Pool::new(2);
        let total = AtomicU64::new(0);
        pool.run(4, &|_| {
            pool.run(5, &|_| {
                total.fetch_add(1, Ordering::Relaxed);
            });
        });
        assert_eq!(total.load(Ordering::Relaxed), 20);
        std::thread::scope(|sc| {
            for _ in 0..3 {
                sc.spawn(|| {
                    pool.run(10, &|_| {
                        total.fetch_add(1, Ordering::Relaxed);
                    })
                });
            }
        });
        assert_eq!(total.load(Ordering::Relaxed), 50);
    }

    #[test]
    fn map_mut_gives_each_task_its_item_and_keeps_the_order() {
        let pool = Pool::new(3);
        for n in [0, 1, 3, 17] {
            let mut items: Vec<u64> = (0..n).collect();
            let out = pool.map_mut(&mut items, |i, x| {
                *x += 100;
                (i as u64) * 2
            });
            assert_eq!(out, (0..n).map(|i| i * 2).collect::<Vec<_>>());
            assert_eq!(items, (0..n).map(|i| i + 100).collect::<Vec<_>>());
        }
    }

    #[test]
    fn a_panicking_task_is_reraised_and_the_pool_stays_usable() {
        let pool = Pool::new(2);
        let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            pool.run(8, &|i| assert!(i != 5, "task 5"));
        }));
        assert!(r.is_err());
        let n = AtomicU64::new(0);
        pool.run(8, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 8);
    }
}
