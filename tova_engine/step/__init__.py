"""What the core and the executor share about a step: a request as the front end hands it
over (`CoreRequest`), its bookkeeping in the core (`Request`, `Sequence`: token ids and
counters, never tensors), and the work scheduled for one step (`SchedulerOutput`)."""
