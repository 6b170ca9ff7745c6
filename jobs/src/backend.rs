//! The job streams as an apalis 1.0 backend: workers are apalis `Worker`s reading Hangar's
//! Redis streams (see [`crate::queue`] for why streams and not apalis-redis).
//!
//! A task is one or more deliveries, each holding one of the worker's job slots until the
//! handler drops it: the backend reads only as many entries as there are free slots, so
//! unread work stays on the stream for other workers. Kinds that run batched (creates) get
//! one task per read, so a burst is claimed, placed and settled in a few statements; other
//! kinds get one task per delivery, whose task id is the operation id.
//!
//! The backend never yields an error: an apalis worker whose backend errs stops, which would
//! silently stop a queue. Redis failures are logged and retried here (and a lost stream or
//! group is recreated); Postgres holds the truth, so nothing is lost meanwhile.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use apalis_core::backend::finalize::Ephemeral;
use apalis_core::backend::{Backend, BackendConfig};
use apalis_core::layers::Identity;
use apalis_core::task::Task;
use apalis_core::task::builder::TaskBuilder;
use apalis_core::task::task_id::{RandomId, TaskId};
use apalis_core::worker::context::WorkerContext;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::PollSemaphore;
use tracing::warn;

use crate::queue::{Consumer, Delivery, JobQueue};
use crate::state::OperationKind;

/// A delivery and the job slot it occupies until dropped.
#[derive(Debug)]
pub struct Slotted {
    pub delivery: Delivery,
    pub slot: OwnedSemaphorePermit,
}

/// The argument of a job task: deliveries of one kind read together.
#[derive(Debug)]
pub struct Deliveries(pub Vec<Slotted>);

/// How a [`JobStream`] reads.
#[derive(Debug, Clone)]
pub struct StreamSettings {
    /// Jobs held at once (the slots).
    pub concurrency: usize,
    /// Longest wait of one blocking read; bounds how late a stop is noticed by a read.
    pub block: Duration,
    /// How often to take over entries other consumers held past `reclaim_idle`.
    pub reclaim_every: Duration,
    /// How long an entry stays with a consumer before another may take it over.
    pub reclaim_idle: Duration,
    /// One task per read (the handler settles the batch together) instead of per delivery.
    pub batched: bool,
}

type Read = Pin<Box<dyn Future<Output = ReadOutcome> + Send>>;

struct ReadOutcome {
    consumer: Option<Consumer>,
    deliveries: Vec<Delivery>,
    slots: OwnedSemaphorePermit,
}

/// One job kind's stream, read through the shared consumer group by one worker.
pub struct JobStream {
    queue: JobQueue,
    kind: OperationKind,
    consumer_name: String,
    settings: StreamSettings,
    slots: PollSemaphore,
    /// A free slot seen by `poll_ready`, kept for the next read.
    reserved: Option<OwnedSemaphorePermit>,
    consumer: Option<Consumer>,
    reading: Option<Read>,
    ready: VecDeque<Task<Deliveries>>,
    last_reclaim: Instant,
}

impl JobStream {
    /// `consumer_name` names this worker in the consumer group (unique per process).
    pub fn new(
        queue: JobQueue,
        kind: OperationKind,
        consumer_name: &str,
        settings: StreamSettings,
    ) -> Self {
        let slots = Arc::new(Semaphore::new(settings.concurrency.max(1)));
        Self {
            queue,
            kind,
            consumer_name: consumer_name.to_owned(),
            settings,
            slots: PollSemaphore::new(slots),
            reserved: None,
            consumer: None,
            reading: None,
            ready: VecDeque::new(),
            last_reclaim: Instant::now(),
        }
    }

    /// Takes every free slot (at least one, waiting for it) and starts a read of that many.
    fn start_read(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let mut slots = match self.reserved.take() {
            Some(slot) => slot,
            None => match self.slots.poll_acquire(cx) {
                Poll::Ready(Some(slot)) => slot,
                Poll::Ready(None) => unreachable!("the slot semaphore is never closed"),
                Poll::Pending => return Poll::Pending,
            },
        };
        let semaphore = self.slots.clone_inner();
        let free = semaphore.available_permits() as u32;
        if let Ok(more) = semaphore.try_acquire_many_owned(free) {
            slots.merge(more);
        }
        let reclaim = self.last_reclaim.elapsed() >= self.settings.reclaim_every;
        if reclaim {
            self.last_reclaim = Instant::now();
        }
        self.reading = Some(Box::pin(read(
            self.queue.clone(),
            self.consumer.take(),
            self.kind,
            self.consumer_name.clone(),
            self.settings.clone(),
            reclaim,
            slots,
        )));
        Poll::Ready(())
    }

    /// Turns a read into tasks, one slot per delivery; unused slots are released.
    fn enqueue(&mut self, outcome: ReadOutcome) {
        let ReadOutcome {
            consumer,
            deliveries,
            mut slots,
        } = outcome;
        self.consumer = consumer;
        let slotted = deliveries.into_iter().map(|delivery| Slotted {
            slot: slots.split(1).expect("one slot was taken per entry read"),
            delivery,
        });
        if self.settings.batched {
            let batch: Vec<Slotted> = slotted.collect();
            if !batch.is_empty() {
                let id = TaskId::from_string(batch[0].delivery.entry_id.clone());
                self.ready.push_back(task(batch, id));
            }
        } else {
            for one in slotted {
                let id = match one.delivery.operation_id {
                    Some(op) => TaskId::from_string(op.to_string()),
                    None => TaskId::from_string(one.delivery.entry_id.clone()),
                };
                self.ready.push_back(task(vec![one], id));
            }
        }
    }
}

fn task(slotted: Vec<Slotted>, id: TaskId) -> Task<Deliveries> {
    TaskBuilder::new(Deliveries(slotted)).task_id(id).build()
}

/// Reads up to one entry per slot (or reclaims abandoned ones), opening the consumer's
/// connection first if needed. Failures are logged and yield nothing after a pause.
async fn read(
    queue: JobQueue,
    consumer: Option<Consumer>,
    kind: OperationKind,
    name: String,
    settings: StreamSettings,
    reclaim: bool,
    slots: OwnedSemaphorePermit,
) -> ReadOutcome {
    let count = slots.num_permits();
    let mut consumer = match consumer {
        Some(c) => c,
        None => match queue.consumer(kind, &name, settings.block).await {
            Ok(c) => c,
            Err(error) => {
                warn!(%error, %kind, "cannot open the job stream; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
                return ReadOutcome {
                    consumer: None,
                    deliveries: Vec::new(),
                    slots,
                };
            }
        },
    };
    let result = if reclaim {
        consumer.reclaim(settings.reclaim_idle, count).await
    } else {
        consumer.next_batch(count).await
    };
    match result {
        Ok(deliveries) => ReadOutcome {
            consumer: Some(consumer),
            deliveries,
            slots,
        },
        Err(error) => {
            warn!(%error, %kind, "reading the job stream failed; retrying");
            // Redis may have lost the stream or its group (a restart without persistence):
            // recreate them; the reconciler re-pushes the lost jobs. Any other error may have
            // broken the connection: open a new one.
            let keep = if error.code() == Some("NOGROUP") {
                let _ = queue.ensure_groups().await;
                Some(consumer)
            } else {
                None
            };
            tokio::time::sleep(Duration::from_millis(500)).await;
            ReadOutcome {
                consumer: keep,
                deliveries: Vec::new(),
                slots,
            }
        }
    }
}

impl Backend for JobStream {
    type Task = Task<Deliveries>;
    type Error = Infallible;

    /// Ready when a task is buffered, a read is under way, or a slot is free.
    fn poll_ready(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), Infallible>> {
        if !self.ready.is_empty() || self.reading.is_some() || self.reserved.is_some() {
            return Poll::Ready(Ok(()));
        }
        match self.slots.poll_acquire(cx) {
            Poll::Ready(slot) => {
                self.reserved = slot;
                Poll::Ready(Ok(()))
            }
            Poll::Pending => Poll::Pending,
        }
    }

    fn poll_next(
        &mut self,
        cx: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Option<Result<Self::Task, Infallible>>> {
        loop {
            if let Some(task) = self.ready.pop_front() {
                return Poll::Ready(Some(Ok(task)));
            }
            if self.reading.is_none() && self.start_read(cx).is_pending() {
                return Poll::Pending;
            }
            let reading = self.reading.as_mut().expect("a read was just started");
            match reading.as_mut().poll(cx) {
                Poll::Ready(outcome) => {
                    self.reading = None;
                    self.enqueue(outcome);
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    /// Entries read but not yet handed out stay pending on the stream and are reclaimed
    /// by a live worker after `reclaim_idle`; their operations are untouched.
    fn poll_close(
        &mut self,
        _: &mut Context<'_>,
        _: &WorkerContext,
    ) -> Poll<Result<(), Infallible>> {
        self.reading = None;
        self.ready.clear();
        Poll::Ready(Ok(()))
    }
}

impl BackendConfig for JobStream {
    type Args = Deliveries;
    type Id = RandomId;
    type Kind = Ephemeral;
    type Config = StreamSettings;
    type Layer = Identity;

    fn config(&self) -> &StreamSettings {
        &self.settings
    }

    fn middleware(&mut self, _: &mut WorkerContext) -> Identity {
        Identity::new()
    }
}
