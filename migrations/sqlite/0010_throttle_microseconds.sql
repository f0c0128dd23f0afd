-- Sender rate slots in microseconds (src/delivery/rate.rs): with whole milliseconds every
-- slot took at least 1 ms, capping each sender at 1,000 messages a second, and rates whose
-- interval is not a whole number of milliseconds were rounded down (300/s sent as 250/s).
ALTER TABLE sender_throttle RENAME COLUMN tat TO tat_us;
UPDATE sender_throttle SET tat_us = tat_us * 1000;
