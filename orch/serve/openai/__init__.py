"""The logic behind the OpenAI-compatible routes (``orch/serve/routes/openai.py``).

Each request becomes a ``TaskRequest`` (or an ``EmbeddingRequest``) admitted through
``TaskService``, so sessions, placement, the pool's admission and its bounded queue apply as
they do to ``/v2/tasks``. Chat messages are rendered here with the model's own template
(``orch.core.chat``); the pool only sees a prompt.

- ``serving``: what each endpoint does, answering with the protocol's models
  (``orch.api.openai``).
- ``streams``: a task's events relayed as OpenAI stream chunks, or collected into one answer.
- ``errors``: the error shape, and the validation errors that name an OpenAI code.
"""
