"""The model registry: register the chosen checkpoint with its lineage and decide on the evidence whether it becomes
`champion` (`register`, `lineage`, `report`), and move the alias by hand (`promotion`: `promote`, `rollback`,
`champion`).

May use: evaluation, training, data, safety, models and the core.
"""
