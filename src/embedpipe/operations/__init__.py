"""Operations of the public APIs without HTTP: a request model in, a response body out.

Routes in ``api/`` and batch lines both call these. ``openai_embeddings`` is OpenAI's
embeddings operation (with its request model ``EmbeddingRequest``).
"""
