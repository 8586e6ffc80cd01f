"""The server side of OpenAI's Files and Batch API: objects, stores, the processor, runners.

Exports nothing at package level: the API uses ``service.JobService`` and ``wiring``; the
Celery worker process is ``worker.run_worker``.
"""
