-- A model's provider said a limit is used up (x-ratelimit-remaining-* at 0): hold the
-- model until it resets (hold_model), so that no call meets the 429.
-- ARGV: model, ms. Returns {ms the model is held, 1 if this call lengthened the hold}.
local held, longer = hold_model(ARGV[1], tonumber(ARGV[2]), now_ms())
return {held, longer and 1 or 0}
