-- wrenn-ctl schema, migration 2: users belong to the directory of the team that created
-- them, and an email is unique within one directory regardless of case.
--
-- Before this, `users.email` was unique across all teams and compared case-sensitively:
-- Users/Create told any team whether an email existed in another one, and "A@x" and
-- "a@x" were two users. Now a team sees (and may add as a member) only its members and
-- the users of its own directory; the same email may exist in two directories, which
-- reveals nothing across teams.

ALTER TABLE users ADD COLUMN home_team_id uuid REFERENCES teams(id) ON DELETE SET NULL;

-- Existing users: the team they joined first; users in no team were made by a platform
-- admin (the platform team has no members).
UPDATE users u SET home_team_id = COALESCE(
    (SELECT m.team_id FROM memberships m WHERE m.user_id = u.id
     ORDER BY m.created_at, m.team_id LIMIT 1),
    '00000000-0000-0000-0000-000000000000');

ALTER TABLE users DROP CONSTRAINT IF EXISTS users_email_key;

-- Existing emails that differ only in case within one directory (allowed before) are kept,
-- users and memberships untouched: all but the oldest are marked and left out of the
-- unique index, so this migration never fails on them and never deletes anyone. New users
-- are checked against the unmarked one.
ALTER TABLE users ADD COLUMN email_case_duplicate boolean NOT NULL DEFAULT false;
UPDATE users u SET email_case_duplicate = true WHERE EXISTS (
    SELECT 1 FROM users o
    WHERE o.home_team_id IS NOT DISTINCT FROM u.home_team_id
      AND lower(o.email) = lower(u.email)
      AND (o.created_at, o.id) < (u.created_at, u.id));

CREATE UNIQUE INDEX users_home_email ON users (home_team_id, lower(email))
    WHERE NOT email_case_duplicate;
CREATE INDEX users_home ON users (home_team_id, created_at, id);
