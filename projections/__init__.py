"""Read models in Redis, folded from the event log: views (pure), store, worker, queries."""
