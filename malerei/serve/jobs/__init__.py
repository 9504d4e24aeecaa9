"""Jobs: request specs, the queue interface and its SQL implementation, the worker, batching."""
