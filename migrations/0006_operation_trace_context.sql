-- The W3C trace context (`traceparent`) of the request that created an operation, so that
-- the job's every attempt, and a re-push by the reconciler, continue the request's trace.
-- NULL when tracing is off.
alter table operations add column trace_parent text;
