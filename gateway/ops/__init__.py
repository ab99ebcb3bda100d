"""Operations: metrics (metrics.py), the operator HTTP endpoint (http.py), the queue collector
(queuestats.py), logs, the multi-process supervisor and the allocator tuning (memory.py)."""
