//! The job transport: one Redis stream per job kind, read through one consumer group
//! (by apalis workers, through [`crate::backend::JobStream`]).
//!
//! Why not apalis-redis: its idle workers look for work only at their heartbeat (pickup waits
//! up to the heartbeat interval) and its fetch script stops promoting jobs past ~8,000 due
//! entries (see STACK.md). Streams give blocking reads (a push wakes a parked worker at once),
//! acknowledgements, and reclaiming of entries a dead consumer held.
//!
//! Redis is only the transport: every entry names an operation row in Postgres, which holds
//! the truth (status, attempts, lease), so a duplicated or lost entry is harmless — a
//! duplicate finds its operation already claimed, and the reconciler re-pushes a lost one.

use std::time::Duration;

use redis::aio::MultiplexedConnection;
use redis::streams::{StreamAutoClaimReply, StreamReadOptions, StreamReadReply};
use redis::{AsyncCommands, AsyncConnectionConfig, Client, RedisResult};

use crate::ids::OperationId;
use crate::state::OperationKind;

const GROUP: &str = "workers";
const OP_FIELD: &str = "op";

/// An entry read from a job stream: ack it with its `entry_id` once the job is settled.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub kind: OperationKind,
    pub entry_id: String,
    /// `None` when the entry is malformed (it is acked and dropped).
    pub operation_id: Option<OperationId>,
}

/// Pushes jobs; cheap to clone (one multiplexed connection).
#[derive(Clone)]
pub struct JobQueue {
    client: Client,
    conn: MultiplexedConnection,
    prefix: String,
}

impl JobQueue {
    pub async fn connect(url: &str, prefix: &str) -> RedisResult<Self> {
        let client = Client::open(url)?;
        let conn = client.get_multiplexed_async_connection().await?;
        Ok(Self {
            client,
            conn,
            prefix: prefix.to_owned(),
        })
    }

    /// The namespace of every Redis key Hangar uses (tests use one each).
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    pub fn stream_key(&self, kind: OperationKind) -> String {
        format!("{}:jobs:{}", self.prefix, kind)
    }

    /// Redis key of the live event stream watchers read.
    pub fn events_key(&self) -> String {
        format!("{}:events", self.prefix)
    }

    /// A connection of its own, for Redis commands outside the queue (locks, events).
    pub fn connection(&self) -> MultiplexedConnection {
        self.conn.clone()
    }

    /// Creates the epoch, every stream and its consumer group if missing (idempotent).
    pub async fn ensure_groups(&self) -> RedisResult<()> {
        self.epoch().await?;
        let mut conn = self.conn.clone();
        for kind in OperationKind::ALL {
            let created: RedisResult<()> = conn
                .xgroup_create_mkstream(self.stream_key(*kind), GROUP, "0")
                .await;
            match created {
                Err(e) if e.code() == Some("BUSYGROUP") => {}
                other => other?,
            }
        }
        Ok(())
    }

    /// The current Redis epoch: a random value stored in Redis the first time it is asked
    /// for. Redis that lost its data (restarted without persistence, flushed) comes back
    /// without it and gets a new one, which tells the reconciler that every job pushed in
    /// the old epoch is gone and must be pushed again.
    pub async fn epoch(&self) -> RedisResult<String> {
        let key = format!("{}:epoch", self.prefix);
        let mut conn = self.conn.clone();
        let (epoch,): (String,) = redis::pipe()
            .cmd("SET")
            .arg(&key)
            .arg(crate::keys::random_hex(8))
            .arg("NX")
            .ignore()
            .get(&key)
            .query_async(&mut conn)
            .await?;
        Ok(epoch)
    }

    /// Pushes one job for `operation_id`.
    pub async fn push(&self, kind: OperationKind, operation_id: OperationId) -> RedisResult<()> {
        let mut conn = self.conn.clone();
        let _: String = conn
            .xadd(
                self.stream_key(kind),
                "*",
                &[(OP_FIELD, operation_id.to_string())],
            )
            .await?;
        Ok(())
    }

    /// Pushes many jobs in one round trip (atomically); returns the epoch they were pushed
    /// in (`None` if Redis has none yet: the reconciler's next tick creates it and pushes
    /// them again).
    pub async fn push_many(
        &self,
        jobs: &[(OperationKind, OperationId)],
    ) -> RedisResult<Option<String>> {
        let mut pipe = redis::pipe();
        pipe.atomic().get(format!("{}:epoch", self.prefix));
        for (kind, id) in jobs {
            pipe.xadd(self.stream_key(*kind), "*", &[(OP_FIELD, id.to_string())])
                .ignore();
        }
        let mut conn = self.conn.clone();
        let (epoch,): (Option<String>,) = pipe.query_async(&mut conn).await?;
        Ok(epoch)
    }

    /// Acknowledges and deletes an entry: its job is settled in Postgres. Goes over the
    /// shared connection, since the consumer's own may be parked in a blocking read.
    pub async fn ack(&self, kind: OperationKind, entry_id: &str) -> RedisResult<()> {
        self.ack_many(kind, &[entry_id]).await
    }

    /// Acknowledges and deletes several entries of one stream in one round trip.
    pub async fn ack_many(&self, kind: OperationKind, entry_ids: &[&str]) -> RedisResult<()> {
        if entry_ids.is_empty() {
            return Ok(());
        }
        let key = self.stream_key(kind);
        let mut pipe = redis::pipe();
        pipe.xack(&key, GROUP, entry_ids).ignore();
        pipe.xdel(&key, entry_ids).ignore();
        let mut conn = self.conn.clone();
        pipe.query_async(&mut conn).await
    }

    /// Entries not yet delivered plus entries delivered and not acknowledged, per kind.
    pub async fn depth(&self, kind: OperationKind) -> RedisResult<u64> {
        let mut conn = self.conn.clone();
        let len: u64 = conn.xlen(self.stream_key(kind)).await?;
        Ok(len)
    }

    /// A consumer for one job kind, named after its worker, on a connection of its own
    /// (a blocking read would stall every other command multiplexed on a shared one).
    pub async fn consumer(
        &self,
        kind: OperationKind,
        consumer_name: &str,
        block: Duration,
    ) -> RedisResult<Consumer> {
        let config =
            AsyncConnectionConfig::new().set_response_timeout(Some(block + Duration::from_secs(5)));
        let conn = self
            .client
            .get_multiplexed_async_connection_with_config(&config)
            .await?;
        Ok(Consumer {
            conn,
            kind,
            key: self.stream_key(kind),
            name: consumer_name.to_owned(),
            block,
        })
    }
}

/// Reads one job stream for one worker.
pub struct Consumer {
    conn: MultiplexedConnection,
    kind: OperationKind,
    key: String,
    name: String,
    block: Duration,
}

impl Consumer {
    /// Waits up to the block interval for new entries; returns at once when some arrive.
    pub async fn next_batch(&mut self, count: usize) -> RedisResult<Vec<Delivery>> {
        let options = StreamReadOptions::default()
            .group(GROUP, &self.name)
            .count(count)
            .block(self.block.as_millis() as usize);
        let reply: Option<StreamReadReply> = self
            .conn
            .xread_options(&[&self.key], &[">"], &options)
            .await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|entry| self.delivery(entry.id.clone(), entry.get::<String>(OP_FIELD)))
            .collect())
    }

    /// Takes over entries other consumers have held for longer than `min_idle` (their
    /// worker died or hangs); each comes back as a fresh delivery to this consumer.
    pub async fn reclaim(
        &mut self,
        min_idle: Duration,
        count: usize,
    ) -> RedisResult<Vec<Delivery>> {
        let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
            .arg(&self.key)
            .arg(GROUP)
            .arg(&self.name)
            .arg(min_idle.as_millis() as u64)
            .arg("0-0")
            .arg("COUNT")
            .arg(count)
            .query_async(&mut self.conn)
            .await?;
        Ok(reply
            .claimed
            .into_iter()
            .map(|entry| self.delivery(entry.id.clone(), entry.get::<String>(OP_FIELD)))
            .collect())
    }

    fn delivery(&self, entry_id: String, op: Option<String>) -> Delivery {
        Delivery {
            kind: self.kind,
            entry_id,
            operation_id: op.and_then(|s| s.parse().ok()),
        }
    }
}
