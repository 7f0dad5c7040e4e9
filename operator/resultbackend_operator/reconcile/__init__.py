"""The reconciles, split by concern.

- resultbackend.py: the ResultBackend controller: triggers, the one reconcile,
  its cheap paths (workload events, the periodic check), deletion, and the
  state kept between runs;
- workers.py: injection into the selected workloads and their release;
- rotation.py: when to rotate, and when superseded credentials may go;
- credentials.py: the stores' admin credentials from their Secrets;
- events.py: the Events a run posts.

Status itself is computed by ../status.py (pure functions); the stores are
behind ../backends.
"""
