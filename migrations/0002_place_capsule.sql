-- Placement as one function, so a worker can place a whole batch of capsules in one
-- statement (`select place_capsule(...) from unnest(...)`) and a single placement runs the
-- very same logic.
--
-- Reserves room on the healthy, uncordoned host with the most free vCPUs (or on `p_only`,
-- when the template's snapshot lives there) and records that host on the capsule, once.
-- The capsule row is locked first: a concurrent placement of the same capsule waits, then
-- finds it placed and reserves nothing. The capacity check and the increment happen on the
-- locked host row, so concurrent placements never overbook a host. Returns the host, or
-- null when no host has room or the capsule was already placed.
create function place_capsule(p_capsule uuid, p_vcpus int, p_memory_mb int, p_only uuid)
returns uuid
language plpgsql
as $$
declare
    chosen uuid;
begin
    perform 1 from capsules where id = p_capsule and host_id is null for update;
    if not found then
        return null;
    end if;
    update hosts
    set vcpus_reserved = vcpus_reserved + p_vcpus,
        memory_mb_reserved = memory_mb_reserved + p_memory_mb
    where id = (
            select id from hosts
            where status = 'healthy' and not cordoned
              and vcpus_total - vcpus_reserved >= p_vcpus
              and memory_mb_total - memory_mb_reserved >= p_memory_mb
              and (p_only is null or id = p_only)
            order by vcpus_total - vcpus_reserved desc, id
            limit 1
            for update)
      and vcpus_total - vcpus_reserved >= p_vcpus
      and memory_mb_total - memory_mb_reserved >= p_memory_mb
    returning id into chosen;
    if chosen is null then
        return null;
    end if;
    update capsules set host_id = chosen, updated_at = now() where id = p_capsule;
    return chosen;
end
$$;
