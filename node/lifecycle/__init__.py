"""Every change of state of a job, a delivery or a review, and nowhere else.

Receiving decides *that* a quiet series should be contoured, or that the structure sets it holds
are reviews (`jobs.settle_quiet_series`); the worker claims jobs in arrival order
(`jobs.claim_next`), never two running jobs of one series, and records what it made
(`jobs.record_outputs`) or why it failed (`jobs.fail_job`); the sender takes pending deliveries
(`deliveries.due_deliveries`, `deliveries.take_delivery`) and records each attempt's outcome with
backoff (`deliveries.record_attempt`); an admin queues a delivery again by hand
(`deliveries.resend`); retention marks a finished job's outputs removed
(`jobs.mark_outputs_removed`). Workers on any number of machines share the database: each holds
what it took under a lease its heartbeat renews (`workers.heartbeat`), what a lost worker held is
taken back when the lease runs out (`workers.expire_leases`), and a restart puts this machine's
running jobs back in the queue (`workers.recover_after_restart`). A structure set sent back
becomes a pending review (`reviews.submit_reviews`) that the worker classifies and measures
(`reviews.record_review`). Each transition is one transaction and an event in the job's log, in
words an admin understands, written by `events.add_event` alone.

One module per state machine; imports run events <- workers <- deliveries <- jobs, and
events <- reviews <- jobs. Callers import a name from the module that owns it.
"""
