-- A body longer than Twilio's 1,600 characters (WhatsApp bodies up to 4,096 through the
-- messenger API of seed 001) is sent as consecutive parts: one message row per part, linked
-- by group_id (the first part's id) and sent in part order.
ALTER TABLE messages ADD COLUMN group_id TEXT;
ALTER TABLE messages ADD COLUMN part_index INTEGER;
ALTER TABLE messages ADD COLUMN part_count INTEGER;
CREATE INDEX messages_group ON messages (group_id, part_index) WHERE group_id IS NOT NULL;
CREATE INDEX messages_channel_updated ON messages (channel, updated_at);
