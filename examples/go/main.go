// Command consume-facility-status prints facility transitions from presence's
// `facility-status` topic as they arrive: a downstream Go service's starting point.
//
// franz-go reads the topic with read_committed isolation (the processor writes in
// transactions); hamba/avro decodes each value in whichever framing the processor writes,
// told apart by the first bytes:
//
//   - C3 01: Avro single-object encoding (the default), then the writer schema's
//     CRC-64-AVRO fingerprint (8 bytes, little-endian) and the binary body. Only presence's
//     .avsc files are needed: every released version under schemas/history/ is known by
//     its fingerprint.
//   - 00: the Schema Registry wire format (schema_registry.framing = "confluent"), then the
//     writer schema's registry id (4 bytes, big-endian) and the body. The writer schema is
//     fetched once per id from the registry's Confluent API (GET <registry>/schemas/ids/<id>;
//     -registry-url or SCHEMA_REGISTRY_URL, e.g. Apicurio's
//     http://127.0.0.1:8081/apis/ccompat/v7; basic authentication as
//     https://user:password@host/...) and kept.
//
// Either way the writer schema is resolved to the current one (schemas/facility_status.avsc).
// Each transition is printed as one JSON line, e.g.
//
//	{"facility_id":"clinic-42","region_id":"north","status":"ONLINE","open_sessions":1,"since":1764300000000,"seq":7,"emitted_at":1764300000120}
//
// The latest record per facility is its current status (the topic is compacted); seq rises
// by one per transition of a facility, so a consumer that stores it can drop repeats.
//
//	go run . -bootstrap-servers 127.0.0.1:9092 -from-beginning [-registry-url URL]
package main

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"time"

	"github.com/hamba/avro/v2"
	"github.com/twmb/franz-go/pkg/kgo"
)

// FacilityStatus is schemas/facility_status.avsc.
type FacilityStatus struct {
	FacilityID   string    `avro:"facility_id"`
	RegionID     string    `avro:"region_id"`
	Status       string    `avro:"status"`
	OpenSessions int32     `avro:"open_sessions"`
	Since        time.Time `avro:"since"`
	Seq          int64     `avro:"seq"`
	EmittedAt    time.Time `avro:"emitted_at"`
}

var marker = []byte{0xC3, 0x01}

// decoder knows the current schema and every released one, by fingerprint, and the
// schemas of the registry ids it has met.
type decoder struct {
	reader  avro.Schema
	writers map[uint64]avro.Schema
	// registry is the Confluent-compatible API's base URL; empty: none.
	registry string
	http     *http.Client
	// byID holds each registry id's writer schema, resolved to reader.
	byID map[uint32]avro.Schema
}

func loadSchemas(dir string) (*decoder, error) {
	parse := func(path string) (avro.Schema, uint64, error) {
		text, err := os.ReadFile(path)
		if err != nil {
			return nil, 0, err
		}
		// A cache of its own per file: every version names the same record.
		s, err := avro.ParseBytesWithCache(text, "", &avro.SchemaCache{})
		if err != nil {
			return nil, 0, fmt.Errorf("%s: %w", path, err)
		}
		return s, crc64Avro([]byte(canonical(s))), nil
	}
	reader, fp, err := parse(filepath.Join(dir, "facility_status.avsc"))
	if err != nil {
		return nil, err
	}
	d := &decoder{
		reader:  reader,
		writers: map[uint64]avro.Schema{fp: reader},
		http:    &http.Client{Timeout: 10 * time.Second},
		byID:    map[uint32]avro.Schema{},
	}
	older, _ := filepath.Glob(filepath.Join(dir, "history", "facility_status", "*.avsc"))
	for _, path := range older {
		s, fp, err := parse(path)
		if err != nil {
			return nil, err
		}
		if _, ok := d.writers[fp]; !ok {
			resolved, err := avro.NewSchemaCompatibility().Resolve(reader, s)
			if err != nil {
				return nil, fmt.Errorf("%s: %w", path, err)
			}
			d.writers[fp] = resolved
		}
	}
	return d, nil
}

func (d *decoder) decode(value []byte) (FacilityStatus, error) {
	var out FacilityStatus
	switch {
	case len(value) >= 10 && bytes.Equal(value[:2], marker):
		fp := binary.LittleEndian.Uint64(value[2:10])
		writer, ok := d.writers[fp]
		if !ok {
			return out, fmt.Errorf("unknown schema fingerprint %016x: update schemas/ from presence", fp)
		}
		return out, avro.Unmarshal(writer, value[10:], &out)
	case len(value) >= 5 && value[0] == 0:
		writer, err := d.registered(binary.BigEndian.Uint32(value[1:5]))
		if err != nil {
			return out, err
		}
		return out, avro.Unmarshal(writer, value[5:], &out)
	default:
		return out, errors.New("neither Avro single-object encoding (C3 01) nor the Schema Registry framing (00)")
	}
}

// registered is the writer schema of a registry id, resolved to the reader schema: fetched
// the first time the id is seen, then kept (an id always names the same schema).
func (d *decoder) registered(id uint32) (avro.Schema, error) {
	if s, ok := d.byID[id]; ok {
		return s, nil
	}
	if d.registry == "" {
		return nil, fmt.Errorf("schema registry id %d: pass -registry-url (or set SCHEMA_REGISTRY_URL) to read the confluent framing", id)
	}
	req, err := http.NewRequest(http.MethodGet, fmt.Sprintf("%s/schemas/ids/%d", strings.TrimRight(d.registry, "/"), id), nil)
	if err != nil {
		return nil, err
	}
	// Credentials in the URL (https://user:password@host/...) go as basic authentication;
	// messages show the URL without the password.
	url := req.URL.Redacted()
	req.Header.Set("Accept", "application/vnd.schemaregistry.v1+json")
	resp, err := d.http.Do(req)
	if err != nil {
		return nil, fmt.Errorf("schema registry: %w", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("schema registry: GET %s answered %s", url, resp.Status)
	}
	var answer struct {
		Schema string `json:"schema"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&answer); err != nil {
		return nil, fmt.Errorf("schema registry: GET %s: %w", url, err)
	}
	writer, err := avro.ParseWithCache(answer.Schema, "", &avro.SchemaCache{})
	if err != nil {
		return nil, fmt.Errorf("schema registry id %d is not an Avro schema: %w", id, err)
	}
	// One of presence's released versions (the usual case): the schema already resolved.
	resolved, ok := d.writers[crc64Avro([]byte(canonical(writer)))]
	if !ok {
		if resolved, err = avro.NewSchemaCompatibility().Resolve(d.reader, writer); err != nil {
			return nil, fmt.Errorf("schema registry id %d cannot be read as schemas/facility_status.avsc: %w", id, err)
		}
	}
	d.byID[id] = resolved
	return resolved, nil
}

// withLogicalType is a primitive with a logical type in hamba/avro's Schema.String().
var withLogicalType = regexp.MustCompile(`\{"type":"(int|long|bytes|string)","logicalType":"[^"]*"\}`)

// canonical is the specification's Parsing Canonical Form. hamba/avro's Schema.String() is
// that form except that it keeps logical types, which the specification strips
// ({"type":"long","logicalType":"timestamp-millis"} is "long"); fingerprints computed on it
// would match no other implementation.
func canonical(s avro.Schema) string {
	return withLogicalType.ReplaceAllString(s.String(), `"$1"`)
}

// crc64Avro is the Avro specification's CRC-64-AVRO (Rabin) fingerprint of a schema's
// Parsing Canonical Form.
func crc64Avro(data []byte) uint64 {
	const empty = 0xc15d213aa4d7a795
	var table [256]uint64
	for i := range table {
		fp := uint64(i)
		for j := 0; j < 8; j++ {
			fp = (fp >> 1) ^ (empty & -(fp & 1))
		}
		table[i] = fp
	}
	fp := uint64(empty)
	for _, b := range data {
		fp = (fp >> 8) ^ table[byte(fp)^b]
	}
	return fp
}

func main() {
	brokers := flag.String("bootstrap-servers", envOr("KAFKA_BROKERS", "127.0.0.1:9092"), "Kafka brokers, comma-separated")
	topic := flag.String("topic", "facility-status", "the transitions topic")
	group := flag.String("group-id", "", "consumer group (default: none, every partition from the chosen end)")
	fromBeginning := flag.Bool("from-beginning", false, "read the topic from its start")
	schemas := flag.String("schemas", filepath.Join("..", "..", "schemas"), "presence's schemas/ directory")
	registry := flag.String("registry-url", os.Getenv("SCHEMA_REGISTRY_URL"), "the schema registry's Confluent API, for the confluent framing, e.g. http://127.0.0.1:8081/apis/ccompat/v7")
	maxRecords := flag.Int("max-records", 0, "stop after this many transitions (0: never)")
	timeout := flag.Duration("timeout", 0, "stop after this long (0: never)")
	flag.Parse()

	dec, err := loadSchemas(*schemas)
	if err != nil {
		fmt.Fprintf(os.Stderr, "schemas: %v\n", err)
		os.Exit(2)
	}
	dec.registry = *registry
	start := kgo.NewOffset().AtEnd()
	if *fromBeginning {
		start = kgo.NewOffset().AtStart()
	}
	opts := []kgo.Opt{
		kgo.SeedBrokers(strings.Split(*brokers, ",")...),
		kgo.ConsumeTopics(*topic),
		kgo.ConsumeResetOffset(start),
		// Only transitions the processor committed.
		kgo.FetchIsolationLevel(kgo.ReadCommitted()),
	}
	if *group != "" {
		opts = append(opts, kgo.ConsumerGroup(*group))
	}
	client, err := kgo.NewClient(opts...)
	if err != nil {
		fmt.Fprintf(os.Stderr, "kafka: %v\n", err)
		os.Exit(2)
	}
	defer client.Close()

	ctx := context.Background()
	if *timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, *timeout)
		defer cancel()
	}
	out := json.NewEncoder(os.Stdout)
	printed := 0
	for *maxRecords == 0 || printed < *maxRecords {
		fetches := client.PollFetches(ctx)
		if ctx.Err() != nil {
			fmt.Fprintf(os.Stderr, "stopping: %v passed\n", *timeout)
			if *maxRecords > 0 {
				os.Exit(1)
			}
			return
		}
		fetches.EachError(func(t string, p int32, err error) {
			fmt.Fprintf(os.Stderr, "kafka: %s/%d: %v\n", t, p, err)
		})
		fetches.EachRecord(func(r *kgo.Record) {
			s, err := dec.decode(r.Value)
			if err != nil {
				fmt.Fprintf(os.Stderr, "%s/%d@%d: %v\n", r.Topic, r.Partition, r.Offset, err)
				return
			}
			_ = out.Encode(map[string]any{
				"facility_id": s.FacilityID, "region_id": s.RegionID, "status": s.Status,
				"open_sessions": s.OpenSessions, "since": s.Since.UnixMilli(), "seq": s.Seq,
				"emitted_at": s.EmittedAt.UnixMilli(),
			})
			printed++
		})
	}
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}
