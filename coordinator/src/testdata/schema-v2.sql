-- The schema of database version 2 (before slots and pilots had state
-- tables), kept to test the upgrade from it. Never change it.
CREATE TABLE IF NOT EXISTS workspaces (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, owner TEXT NOT NULL, spec TEXT NOT NULL,
  state TEXT NOT NULL, reason TEXT, created_ms INTEGER NOT NULL, updated_ms INTEGER NOT NULL,
  expires_ms INTEGER);
CREATE TABLE IF NOT EXISTS slots (
  id TEXT PRIMARY KEY, workspace_id TEXT NOT NULL, grp TEXT NOT NULL, job_id TEXT,
  nodes INTEGER NOT NULL, cores INTEGER NOT NULL, memory_mb INTEGER NOT NULL,
  state TEXT NOT NULL, cancel_pending INTEGER NOT NULL DEFAULT 0, job_ended INTEGER NOT NULL DEFAULT 0,
  created_ms INTEGER NOT NULL);
CREATE INDEX IF NOT EXISTS slots_ws ON slots(workspace_id);
CREATE TABLE IF NOT EXISTS pilots (
  slot_id TEXT NOT NULL, node TEXT NOT NULL, pilot_id TEXT NOT NULL, last_event TEXT NOT NULL,
  reserved INTEGER NOT NULL DEFAULT 0, released INTEGER NOT NULL DEFAULT 0,
  last_seen_ms INTEGER NOT NULL, PRIMARY KEY (slot_id, node));
CREATE TABLE IF NOT EXISTS vms (
  id TEXT PRIMARY KEY, workspace_id TEXT NOT NULL, slot_id TEXT NOT NULL, grp TEXT NOT NULL,
  idx INTEGER NOT NULL, name TEXT NOT NULL, node TEXT, state TEXT NOT NULL,
  memory_mb INTEGER NOT NULL, cpus INTEGER NOT NULL, image TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS vms_ws ON vms(workspace_id);
CREATE INDEX IF NOT EXISTS vms_slot_node ON vms(slot_id, node);
CREATE TABLE IF NOT EXISTS commands (
  slot_id TEXT NOT NULL, node TEXT NOT NULL, id INTEGER NOT NULL, body TEXT NOT NULL,
  created_ms INTEGER NOT NULL, PRIMARY KEY (slot_id, node, id));
-- Every stored pilot event, as received: an append-only log for admins and
-- audits. No index: replays are caught by pilot_seqs (one small row per
-- pilot instance, updated in place), where a (pilot_id, seq) key put every
-- event on a random page of an index that grew with every event (a third
-- of the pages the event writer wrote under load).
CREATE TABLE IF NOT EXISTS pilot_events (
  pilot_id TEXT NOT NULL, seq INTEGER NOT NULL, slot_id TEXT NOT NULL, node TEXT NOT NULL,
  ts_ms INTEGER NOT NULL, recorded_ms INTEGER NOT NULL, body TEXT NOT NULL);
-- Per pilot instance, the highest sequence number stored. A pilot sends its
-- events in order, one at a time, so any seq at or below it was stored.
CREATE TABLE IF NOT EXISTS pilot_seqs (
  pilot_id TEXT PRIMARY KEY, last_seq INTEGER NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS timeline (
  workspace_id TEXT NOT NULL, seq INTEGER NOT NULL, ts_ms INTEGER NOT NULL,
  recorded_ms INTEGER NOT NULL, phase TEXT NOT NULL, slot_id TEXT, node TEXT, vm_id TEXT,
  detail TEXT NOT NULL, PRIMARY KEY (workspace_id, seq));
CREATE TABLE IF NOT EXISTS addresses (
  workspace_id TEXT NOT NULL, vm_id TEXT NOT NULL, nic INTEGER NOT NULL, pool TEXT NOT NULL,
  ip TEXT NOT NULL, mac TEXT NOT NULL, prefix_len INTEGER NOT NULL, gateway TEXT,
  PRIMARY KEY (vm_id, nic), UNIQUE (pool, ip));
CREATE INDEX IF NOT EXISTS addresses_ws ON addresses(workspace_id);
CREATE TABLE IF NOT EXISTS workspace_peers (
  workspace_id TEXT PRIMARY KEY, peers TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS node_images (
  slot_id TEXT NOT NULL, node TEXT NOT NULL, image TEXT NOT NULL,
  PRIMARY KEY (slot_id, node, image));

-- Counters for the per-event rules ("are all VMs running?", "have all pilots
-- of the slot released?"), kept by triggers so that each event reads one or
-- a few rows instead of counting the workspace's N VMs or the slot's N
-- pilots (O(N) per event, O(N^2) per lease: 15 % of the coordinator's CPU at
-- N = 1024 before). Triggers, not Rust code, so that no write path can
-- forget them; they fire only when a counted column changes, and the row
-- they touch is per workspace or slot (a page the batch writes anyway).
CREATE TABLE IF NOT EXISTS vm_counts (
  workspace_id TEXT NOT NULL, state TEXT NOT NULL, n INTEGER NOT NULL,
  PRIMARY KEY (workspace_id, state)) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS vm_counts_insert AFTER INSERT ON vms BEGIN
  INSERT INTO vm_counts (workspace_id, state, n) VALUES (new.workspace_id, new.state, 1)
    ON CONFLICT (workspace_id, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS vm_counts_update AFTER UPDATE OF state, workspace_id ON vms
  WHEN old.state IS NOT new.state OR old.workspace_id IS NOT new.workspace_id BEGIN
  UPDATE vm_counts SET n = n - 1 WHERE workspace_id = old.workspace_id AND state = old.state;
  INSERT INTO vm_counts (workspace_id, state, n) VALUES (new.workspace_id, new.state, 1)
    ON CONFLICT (workspace_id, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS vm_counts_delete AFTER DELETE ON vms BEGIN
  UPDATE vm_counts SET n = n - 1 WHERE workspace_id = old.workspace_id AND state = old.state;
END;
-- holding: reserved and not released.
CREATE TABLE IF NOT EXISTS pilot_counts (
  slot_id TEXT PRIMARY KEY, pilots INTEGER NOT NULL, holding INTEGER NOT NULL,
  released INTEGER NOT NULL) WITHOUT ROWID;
CREATE TRIGGER IF NOT EXISTS pilot_counts_insert AFTER INSERT ON pilots BEGIN
  INSERT INTO pilot_counts (slot_id, pilots, holding, released)
    VALUES (new.slot_id, 1, new.reserved = 1 AND new.released = 0, new.released = 1)
    ON CONFLICT (slot_id) DO UPDATE SET pilots = pilots + 1,
      holding = holding + excluded.holding, released = released + excluded.released;
END;
CREATE TRIGGER IF NOT EXISTS pilot_counts_update AFTER UPDATE OF reserved, released, slot_id ON pilots
  WHEN old.reserved IS NOT new.reserved OR old.released IS NOT new.released
    OR old.slot_id IS NOT new.slot_id BEGIN
  UPDATE pilot_counts SET pilots = pilots - 1,
      holding = holding - (old.reserved = 1 AND old.released = 0),
      released = released - (old.released = 1)
    WHERE slot_id = old.slot_id;
  INSERT INTO pilot_counts (slot_id, pilots, holding, released)
    VALUES (new.slot_id, 1, new.reserved = 1 AND new.released = 0, new.released = 1)
    ON CONFLICT (slot_id) DO UPDATE SET pilots = pilots + 1,
      holding = holding + excluded.holding, released = released + excluded.released;
END;
CREATE TRIGGER IF NOT EXISTS pilot_counts_delete AFTER DELETE ON pilots BEGIN
  UPDATE pilot_counts SET pilots = pilots - 1,
      holding = holding - (old.reserved = 1 AND old.released = 0),
      released = released - (old.released = 1)
    WHERE slot_id = old.slot_id;
END;
PRAGMA user_version = 2;
