-- Draining a host: an operator cordons it (no new placements) and asks for its capsules to
-- be moved off or destroyed. The time of the request marks the host as draining until it is
-- uncordoned; nothing is destroyed automatically.
alter table hosts add column drain_requested_at timestamptz;
