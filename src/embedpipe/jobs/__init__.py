"""Batch jobs: dataset files in and vectors out (``formats``), run in process (``local``)."""
