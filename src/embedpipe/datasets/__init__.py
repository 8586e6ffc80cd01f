"""The dataset tool behind ``embedpipe embed``: file formats, resumable runs, the remote client.

Exports nothing at package level: ``local.embed_file`` runs in process, ``remote.run_remote_job``
through a server's Batch API; ``formats`` reads and writes the files.
"""
